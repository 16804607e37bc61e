//! `amqp-exec-count-alloc`: the `amqp-exec` binary with an allocator that
//! counts its allocations, for the throughput benchmark (cargo feature
//! `count-alloc`, off by default). With `AMQP_EXEC_COUNT_ALLOC_FILE` set,
//! the number of allocations made up to the end of `main` is written to
//! that file; the benchmark runs two job counts and takes the difference
//! per job.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

#[path = "../../src/main.rs"]
mod amqp_exec_main;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// The system allocator, counting allocations (reallocations included).
struct Counting;

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn main() {
    let file = std::env::var_os("AMQP_EXEC_COUNT_ALLOC_FILE");
    amqp_exec_main::main();
    if let Some(file) = file {
        let n = ALLOCATIONS.load(Ordering::Relaxed);
        let _ = std::fs::write(file, n.to_string());
    }
}
