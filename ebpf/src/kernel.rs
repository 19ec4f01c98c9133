//! The kernel side of what both objects share.

use aya_ebpf::maps::PerCpuArray;

/// Adds one to the counter at `index` of `counters`.
pub fn count(counters: &PerCpuArray<u64>, index: u32) {
    if let Some(counter) = counters.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot: nothing else writes it while this program runs on this CPU.
        unsafe { *counter += 1 };
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
