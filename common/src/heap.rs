//! jemalloc as the global allocator, with its sampling heap profiler built in
//! (docs/architecture.md, "Profiles and task dumps").
//!
//! Each service's `main.rs` says [`crate::jemalloc_with_heap_profiling!`]:
//! it installs jemalloc and exports jemalloc's start-up options with the
//! profiler compiled in (`prof:true`) but not sampling (`prof_active:false`).
//! [`set_active`] turns sampling on at start when `[admin] heap_profiling`
//! says so; `GET /debug/pprof/heap` then dumps what is live.
//!
//! The options live in the binary, not in an environment variable
//! (`_RJEM_MALLOC_CONF`), so every way of starting a service — labctl,
//! compose, a test, a user by hand — profiles the same way.

/// Installs jemalloc as the global allocator and exports its options. Use
/// once, at the top level of a binary crate.
#[macro_export]
macro_rules! jemalloc_with_heap_profiling {
    () => {
        #[global_allocator]
        static GLOBAL_ALLOCATOR: $crate::heap::Jemalloc = $crate::heap::Jemalloc;

        /// jemalloc reads its start-up options from this symbol. One sample
        /// per 512 KiB allocated on average (`lg_prof_sample:19`) keeps
        /// sampling cheap while leaks of many small objects still show.
        // Exporting a symbol by name is `unsafe` in edition 2024: it must
        // not clash with another; jemalloc's (prefixed) name is reserved
        // for exactly this.
        #[allow(unsafe_code, non_upper_case_globals)]
        #[unsafe(export_name = "_rjem_malloc_conf")]
        pub static malloc_conf: &[u8] = b"prof:true,prof_active:false,lg_prof_sample:19\0";
    };
}

pub use tikv_jemallocator::Jemalloc;

/// Why the heap profile cannot be taken, for the route's answer.
pub const OFF_HINT: &str = "heap profiling is off in this process: set `[admin] heap_profiling = true` \
     (or pass --set admin.heap_profiling=true) and restart the service";

/// Turns jemalloc's allocation sampling on or off. An error when jemalloc's
/// profiler is not there (another allocator, or built without it).
pub async fn set_active(active: bool) -> Result<(), String> {
    let Some(ctl) = jemalloc_pprof::PROF_CTL.as_ref() else {
        return Err(
            "jemalloc's heap profiler is not in this binary (jemalloc is not \
                    the global allocator, or was built without `prof:true`)"
                .into(),
        );
    };
    let mut ctl = ctl.lock().await;
    let result = if active {
        ctl.activate()
    } else {
        ctl.deactivate()
    };
    result.map_err(|e| format!("jemalloc refused prof.active={active}: {e}"))
}

/// What `GET /debug/pprof/heap` answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeapFormat {
    /// Gzipped pprof protobuf (inuse_space, bytes).
    Pprof,
    /// A flame graph of live bytes.
    Svg,
}

/// Why a heap dump failed.
#[derive(Debug, thiserror::Error)]
pub enum HeapDumpError {
    #[error("{0}")]
    Off(&'static str),
    #[error("dumping the heap profile failed: {0}")]
    Dump(String),
}

/// Dumps the live heap in `format`. Symbolising reads the binary's debug
/// info and takes a while: the caller runs it off the async runtime.
pub fn dump(format: HeapFormat) -> Result<Vec<u8>, HeapDumpError> {
    let ctl = jemalloc_pprof::PROF_CTL.as_ref().ok_or(HeapDumpError::Off(
        "jemalloc's heap profiler is not in this binary",
    ))?;
    let mut ctl = ctl.blocking_lock();
    if !ctl.activated() {
        return Err(HeapDumpError::Off(OFF_HINT));
    }
    let dumped = match format {
        HeapFormat::Pprof => ctl.dump_pprof(),
        HeapFormat::Svg => ctl.dump_flamegraph(),
    };
    dumped.map_err(|e| HeapDumpError::Dump(format!("{e:#}")))
}
