//! Whether the fused kernels are used: on by default, `TORCHSCALE_FUSED=0` turns them off for the
//! whole process, and [`with_fused`] overrides the choice on the calling thread (tests compare the
//! fused and the composed paths this way, side by side in one process).

use std::cell::Cell;
use std::sync::OnceLock;

thread_local! {
    static OVERRIDE: Cell<Option<bool>> = const { Cell::new(None) };
}

fn process_default() -> bool {
    static DEFAULT: OnceLock<bool> = OnceLock::new();
    *DEFAULT.get_or_init(|| {
        !matches!(
            std::env::var("TORCHSCALE_FUSED").as_deref(),
            Ok("0") | Ok("false") | Ok("off")
        )
    })
}

/// True when the fused kernels are used on this thread.
pub fn fused_enabled() -> bool {
    OVERRIDE.with(|o| o.get()).unwrap_or_else(process_default)
}

/// Runs `f` with the fused kernels switched `on` (or off) on this thread, then restores the
/// previous choice, even if `f` panics.
pub fn with_fused<R>(on: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<bool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OVERRIDE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(OVERRIDE.with(|o| o.replace(Some(on))));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_is_scoped() {
        let before = fused_enabled();
        with_fused(!before, || {
            assert_eq!(fused_enabled(), !before);
            with_fused(before, || assert_eq!(fused_enabled(), before));
            assert_eq!(fused_enabled(), !before);
        });
        assert_eq!(fused_enabled(), before);
    }
}
