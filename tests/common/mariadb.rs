//! A database and a user of their own on the real MariaDB, for one test;
//! dropped with the fixture.

use mysql::prelude::Queryable;
use mysql::{Conn, Opts};
use std::sync::atomic::{AtomicU32, Ordering};

pub const ROOT_URL: &str = "mysql://root@127.0.0.1:3306/mysql";

/// Connects as root, or fails the test saying what to start.
pub fn root() -> Conn {
    let url = std::env::var("MYSQL_ROOT_URL").unwrap_or_else(|_| ROOT_URL.to_owned());
    Conn::new(Opts::from_url(&url).expect("MYSQL_ROOT_URL")).unwrap_or_else(|e| {
        panic!(
            "MariaDB is not reachable at {url}: {e}. These tests need a real MariaDB \
             (127.0.0.1:3306, root without password): run .ci/run's setup or set MYSQL_ROOT_URL."
        )
    })
}

pub struct TestDb {
    pub name: String,
    pub user: String,
    pub password: String,
}

impl TestDb {
    /// Creates `ae_<tag>_<pid>_<n>` and a user allowed only there.
    pub fn create(tag: &str) -> TestDb {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let name = format!("ae_{tag}_{}_{n}", std::process::id());
        let user = format!("aeu_{}_{n}_{tag}", std::process::id());
        let password = format!("pw-{}-secret", std::process::id());
        let mut root = root();
        root.query_drop(format!("DROP DATABASE IF EXISTS `{name}`"))
            .unwrap();
        root.query_drop(format!("CREATE DATABASE `{name}`"))
            .unwrap();
        for host in ["%", "localhost"] {
            root.query_drop(format!("DROP USER IF EXISTS '{user}'@'{host}'"))
                .unwrap();
            root.query_drop(format!(
                "CREATE USER '{user}'@'{host}' IDENTIFIED BY '{password}'"
            ))
            .unwrap();
            root.query_drop(format!("GRANT ALL ON `{name}`.* TO '{user}'@'{host}'"))
                .unwrap();
        }
        TestDb {
            name,
            user,
            password,
        }
    }

    /// The URL the workers get.
    pub fn url(&self) -> String {
        format!(
            "mysql://{}:{}@127.0.0.1:3306/{}",
            self.user, self.password, self.name
        )
    }

    /// A root connection using this database.
    pub fn conn(&self) -> Conn {
        let mut c = root();
        c.query_drop(format!("USE `{}`", self.name)).unwrap();
        c
    }

    /// Runs a file of `;`-separated statements.
    pub fn load(&self, sql: &str) {
        let mut c = self.conn();
        let code: String = sql
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        for stmt in code.split(';') {
            if !stmt.trim().is_empty() {
                c.query_drop(stmt).unwrap();
            }
        }
    }

    /// Open connections of the test user.
    pub fn user_connections(&self, root: &mut Conn) -> u64 {
        root.exec_first(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = ?",
            (&self.user,),
        )
        .unwrap()
        .unwrap_or(0)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut root) = std::panic::catch_unwind(root) {
            let _ = root.query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.name));
            for host in ["%", "localhost"] {
                let _ = root.query_drop(format!("DROP USER IF EXISTS '{}'@'{host}'", self.user));
            }
        }
    }
}
