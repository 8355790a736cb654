//! A process's own counters as the kernel keeps them in `/proc`: CPU time
//! (user + system, `utime` + `stime` of `/proc/<pid>/stat`) and resident
//! memory (`VmRSS` of `/proc/<pid>/status`). Benchmarks read them before
//! and after a window: a process's CPU per request is far less noisy on a
//! shared machine than its throughput, and needs nothing from the process.

use std::sync::OnceLock;

/// One reading of a process's counters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    /// CPU time used since the process started, all threads, user + system.
    pub cpu_seconds: f64,
    /// Resident set size right now.
    pub rss_bytes: u64,
}

/// Why a process could not be read.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("reading /proc/{pid}: the process is gone")]
    Gone {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("/proc/{pid}/{file} has no readable {field}")]
    Unreadable {
        pid: u32,
        file: &'static str,
        field: &'static str,
    },
}

/// Reads `pid`'s counters now.
pub fn usage(pid: u32) -> Result<Usage, UsageError> {
    let read = |file: &'static str| {
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
            .map_err(|source| UsageError::Gone { pid, source })
    };
    let unreadable = |file, field| UsageError::Unreadable { pid, file, field };
    let ticks = cpu_ticks(&read("stat")?).ok_or_else(|| unreadable("stat", "utime/stime"))?;
    let rss_kib = vm_rss_kib(&read("status")?).ok_or_else(|| unreadable("status", "VmRSS"))?;
    Ok(Usage {
        cpu_seconds: ticks as f64 / clock_ticks_per_second() as f64,
        rss_bytes: rss_kib * 1024,
    })
}

/// `utime + stime` (fields 14 and 15) of a `/proc/<pid>/stat` line. The
/// command name (field 2) may hold spaces and parentheses, so fields are
/// counted after its last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS:   1234 kB` of `/proc/<pid>/status`.
fn vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The unit of `utime`/`stime`: `sysconf(_SC_CLK_TCK)`, which the kernel
/// hands every process in its auxiliary vector (`AT_CLKTCK`); read from
/// `/proc/self/auxv` to stay free of `unsafe`. 100 if it cannot be read,
/// which is what Linux uses on every common architecture.
pub fn clock_ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::fs::read("/proc/self/auxv")
            .ok()
            .and_then(|auxv| auxv_entry(&auxv, AT_CLKTCK))
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// The auxiliary vector's key for the clock tick rate (`<elf.h>`).
const AT_CLKTCK: u64 = 17;

/// The value of `key` in an auxiliary vector: native-endian (key, value)
/// pairs of machine words, ended by key 0.
fn auxv_entry(auxv: &[u8], key: u64) -> Option<u64> {
    const WORD: usize = std::mem::size_of::<usize>();
    let word = |bytes: &[u8]| -> Option<u64> {
        let array: [u8; WORD] = bytes.try_into().ok()?;
        u64::try_from(usize::from_ne_bytes(array)).ok()
    };
    auxv.chunks_exact(2 * WORD)
        .map(|pair| Some((word(&pair[..WORD])?, word(&pair[WORD..])?)))
        .take_while(|entry| entry.is_some_and(|(k, _)| k != 0))
        .flatten()
        .find_map(|(k, v)| (k == key).then_some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_counted_after_the_command_name() {
        // A command name with spaces and a parenthesis, as `comm` may be.
        let stat = "4242 (tokio (rt) 1) S 1 4242 4242 0 -1 4194560 2345 0 0 0 \
                    731 269 0 0 20 0 9 0 123456 1000000 2500 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some(731 + 269));
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn usage_counts_the_cpu_this_process_burns() {
        let me = std::process::id();
        let cpu = || usage(me).expect("this process has a stat").cpu_seconds;
        let before = cpu();
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut spins = 0u64;
        // Burn CPU until the kernel has charged 50 ms more to this process.
        while cpu() < before + 0.05 {
            spins = std::hint::black_box(spins.wrapping_add(1));
            assert!(std::time::Instant::now() < give_up, "no CPU time charged");
        }
        assert!(usage(me).expect("read").rss_bytes > 0);
        assert!(
            matches!(usage(u32::MAX), Err(UsageError::Gone { .. })),
            "no such process"
        );
    }

    #[test]
    fn rss_comes_from_the_vmrss_line() {
        let status = "Name:\tservice-a\nVmPeak:\t  900000 kB\nVmRSS:\t   51234 kB\nThreads:\t9\n";
        assert_eq!(vm_rss_kib(status), Some(51234));
        assert_eq!(vm_rss_kib("Name:\tx\n"), None);
    }

    #[test]
    fn the_clock_tick_rate_is_read_from_the_auxiliary_vector() {
        let word = |v: u64| (v as usize).to_ne_bytes();
        let auxv: Vec<u8> = [(6, 4096), (AT_CLKTCK, 250), (0, 0), (AT_CLKTCK, 1)]
            .into_iter()
            .flat_map(|(k, v)| [word(k), word(v)].concat())
            .collect();
        assert_eq!(auxv_entry(&auxv, AT_CLKTCK), Some(250));
        assert_eq!(auxv_entry(&auxv, 99), None, "nothing after the end marker");
        assert!(clock_ticks_per_second() > 0);
    }

    #[test]
    fn this_process_can_be_read() {
        let me = usage(std::process::id()).expect("own /proc entry");
        assert!(me.rss_bytes > 0);
        assert!(me.cpu_seconds >= 0.0);
    }
}
