//! The queue's command: where `execvp` finds it, and whether a user may
//! execute it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Finds `program` as the worker's `execvp` will: as a path when it has a
/// slash (relative to `working_dir` when one is set), else in `path`.
pub fn resolve_command(
    program: &str,
    path: Option<&std::ffi::OsStr>,
    working_dir: Option<&Path>,
) -> Result<PathBuf, String> {
    if program.contains('/') {
        let p = match working_dir {
            Some(dir) if Path::new(program).is_relative() => dir.join(program),
            _ => PathBuf::from(program),
        };
        return executable(&p).map(|_| p);
    }
    let default_path = std::ffi::OsString::from("/usr/local/bin:/usr/bin:/bin");
    let search = path.unwrap_or(&default_path);
    for dir in std::env::split_paths(search) {
        let candidate = dir.join(program);
        if executable(&candidate).is_ok() {
            return Ok(candidate);
        }
    }
    Err(format!("command \"{program}\" not found in PATH"))
}

/// Checks that `path` is an executable file for this process.
pub(super) fn executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("command {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("command {} is not a file", path.display()));
    }
    if meta.permissions().mode() & 0o111 == 0
        || nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_err()
    {
        return Err(format!("command {} is not executable", path.display()));
    }
    Ok(())
}

/// `program` as [`resolve_command`] finds it for a queue with `env` and
/// `working_dir`, if it is there (a missing command pauses its queue, and
/// is no config error).
pub(super) fn resolve_existing(
    program: &str,
    env: &Option<BTreeMap<String, String>>,
    working_dir: Option<&Path>,
) -> Option<PathBuf> {
    let path = match env.as_ref().and_then(|e| e.get("PATH")) {
        Some(p) => Some(std::ffi::OsString::from(p)),
        None => std::env::var_os("PATH"),
    };
    resolve_command(program, path.as_deref(), working_dir).ok()
}

/// Checks that the file at `path` may be executed by user `uid` with the
/// groups `gids`, by its mode bits (root needs any execute bit).
pub fn executable_by(path: &Path, uid: u32, gids: &[u32]) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("command {}: {e}", path.display()))?;
    let mode = meta.mode();
    let allowed = if uid == 0 {
        mode & 0o111 != 0
    } else if meta.uid() == uid {
        mode & 0o100 != 0
    } else if gids.contains(&meta.gid()) {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    };
    if allowed {
        Ok(())
    } else {
        Err(format!(
            "command {} (mode {:o}, owner {}:{}) cannot be executed",
            path.display(),
            mode & 0o7777,
            meta.uid(),
            meta.gid()
        ))
    }
}
