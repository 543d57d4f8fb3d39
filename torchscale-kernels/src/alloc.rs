//! An allocator for training binaries (feature `mimalloc`).
//!
//! A library does not pick the process allocator; a binary does, in two lines:
//!
//! ```no_run
//! #[global_allocator]
//! static ALLOC: torchscale_kernels::alloc::Allocator = torchscale_kernels::alloc::Allocator {};
//! fn main() {
//!     torchscale_kernels::alloc::keep_freed_memory();
//! }
//! ```
//!
//! Every candle op allocates its output, and a training step frees and reallocates the same large
//! buffers each step. The system allocator hands big buffers back to the kernel on free, so each
//! step faults its memory in again (a third of the step on this 2-core machine before this was
//! set). mimalloc with purging off keeps freed pages mapped and reuses them: measured with
//! `cargo xtask bench train` on the Magneto LM, 1.28 s per step against 1.69 s with glibc's
//! defaults, for a peak of 2.9 GB against 2.2 GB (PyTorch: 3.9 GB).

/// The binary's global allocator.
pub type Allocator = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e`, mimalloc.h, v2).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never return freed pages to the operating system: the next step's tensors reuse them. Call it
/// first thing in `main`.
pub fn keep_freed_memory() {
    // SAFETY: sets a plain integer option; mimalloc reads it on its next purge decision.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}
