//! The process heap: glibc's allocator set for a small machine, freed
//! memory given back to the system, and what the heap holds (for `covey
//! status` and the metrics).
//!
//! Why: glibc keeps freed memory for reuse. By default it even raises its
//! thresholds after the first large free (a multi-MiB Automerge save), and
//! then keeps up to 64 MiB free at the top of each arena: on a Pi Zero,
//! with 512 MiB for everything, that is memory taken from the scripts.
//! Fixed thresholds make large buffers their own mappings (unmapped when
//! freed) and trim arenas early; a periodic check gives back what
//! fragmentation still holds. glibc also gives threads their own arenas,
//! up to eight per core, and each keeps its own free memory: the runtime's
//! blocking threads come and go (compaction, large merges), so over hours
//! a node held a dozen arenas of scattered free memory (the soak: 11.5 of
//! the compaction leader's 20 MiB of anonymous memory). Arenas are capped
//! at one per core. Other allocators and targets: no-ops, and no heap
//! figures.

use std::time::Duration;

/// Allocations at least this large get their own mapping, returned to the
/// system when freed (glibc's default starts at 128 KiB and rises to
/// 32 MiB after the first large free).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 512 * 1024;
/// Free memory at the top of an arena beyond this is given back at once.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = 1024 * 1024;
/// How often the heap is looked at, and how much held-but-free memory
/// makes the look give it back (free memory between live allocations,
/// which the trim threshold does not reach).
const CHECK_EVERY: Duration = Duration::from_secs(30);
const GIVE_BACK_ABOVE: u64 = 4 * 1024 * 1024;

/// What the heap holds, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Heap {
    /// In live allocations.
    pub in_use: u64,
    /// Taken from the system (live allocations and free memory kept).
    pub held: u64,
}

/// Set the allocator's thresholds and arena cap (once, at start; again is
/// harmless). Threads that already have an arena keep it; arenas are made
/// lazily, when threads contend, so at start there are few.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // One arena per core (glibc's default: 8 per core on 64-bit
        // targets, 2 on 32-bit).
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = cores.min(64) as i32;
        // SAFETY: mallopt only changes allocator parameters.
        unsafe {
            // Setting either threshold also stops glibc adjusting them.
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

/// Return the heap's free memory to the system. Loading a document or
/// saving a snapshot allocates several times the document's size for a
/// moment; glibc keeps freed memory in its arenas, so without this a node
/// that loaded 100,000 keys kept ~30 MiB it no longer used (measured with
/// Automerge alone: +48 MiB after a load, +16 MiB after trimming).
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; no pointer is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The heap now (all arenas and large mappings), where glibc reports it.
pub fn heap() -> Option<Heap> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let m = unsafe { libc::mallinfo2() };
        Some(Heap {
            in_use: (m.uordblks + m.hblkhd) as u64,
            held: (m.arena + m.hblkhd) as u64,
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// Every [`CHECK_EVERY`], give the heap's free memory back when it holds
/// more than [`GIVE_BACK_ABOVE`] of it.
pub fn spawn_trimmer() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let free = heap().map_or(0, |h| h.held.saturating_sub(h.in_use));
            if free > GIVE_BACK_ABOVE {
                // Trimming walks every arena: not on a runtime thread.
                let _ = tokio::task::spawn_blocking(give_back).await;
            }
        }
    })
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    #[test]
    fn heap_counts_a_live_allocation_and_its_release() {
        tune();
        let before = heap().unwrap();
        // Above the mapping threshold: its own mapping, counted at once
        // and gone at once when freed. Other tests allocate meanwhile:
        // big enough, with a margin, to stand out from them.
        const BIG: u64 = 256 << 20;
        const MARGIN: u64 = 64 << 20;
        let big = vec![1u8; BIG as usize];
        let during = heap().unwrap();
        assert!(
            during.in_use + MARGIN >= before.in_use + BIG,
            "{before:?} {during:?}"
        );
        assert!(during.held >= during.in_use);
        drop(big);
        let after = heap().unwrap();
        assert!(
            after.held + BIG <= during.held + MARGIN,
            "{during:?} {after:?}"
        );
    }
}
