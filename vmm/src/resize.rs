//! Resize policy: one requested guest size becomes a virtio-mem request
//! (above boot size) and a balloon target (below it), or, with
//! `hotplug_method=hv-balloon`, one Dynamic Memory target
//! ([`plan_dm_resize`]: the DM device balloons and hot-adds on its own).
//!
//! `plan_resize` and `plan_dm_resize` are pure functions: the API handler validates and plans
//! with it before touching any device, so a refused request changes nothing.
//!
//! Order matters when both devices move. Growing, the balloon deflates
//! first and virtio-mem plugs after it. Shrinking across the boot size,
//! virtio-mem first unplugs everything and the balloon inflates only once
//! the guest has released the hotplugged memory ([`BalloonStep::AfterUnplug`]):
//! unplugging migrates the pages in use out of the hotplugged blocks into
//! boot memory, and a balloon inflating there at the same time leaves the
//! guest room for neither, so neither converges.

use std::sync::{Arc, Mutex};

use devices::hyperv::device::DynamicMemoryDevice;
use devices::virtio::balloon::Balloon;
use devices::virtio::mem::VirtioMem;

/// Balloon page size (virtio-balloon PFNs are 4 KiB).
pub const BALLOON_PAGE: u64 = 4096;

/// The devices that change the guest's memory size.
#[derive(Default)]
pub struct MemoryDevices {
    /// virtio-mem over the hotplug region.
    pub virtio_mem: Option<Arc<Mutex<VirtioMem>>>,
    /// virtio-balloon.
    pub balloon: Option<Arc<Mutex<Balloon>>>,
    /// The Hyper-V Dynamic Memory device (`hotplug_method=hv-balloon`).
    pub hv_balloon: Option<Arc<Mutex<DynamicMemoryDevice>>>,
}

/// What bounds a resize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLimits {
    /// Boot memory.
    pub boot_size: u64,
    /// Hotplug region size (0 without virtio-mem).
    pub hotplug_size: u64,
    /// virtio-mem block size.
    pub block_size: u64,
    /// Whether a balloon can take memory below boot size.
    pub balloon: bool,
}

/// When a plan's balloon target is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalloonStep {
    /// At once, before virtio-mem's requested size: growing (the balloon
    /// deflates first), or shrinking with nothing left to unplug.
    Now,
    /// Once virtio-mem's plugged size is down to the plan's
    /// `hotplug_requested`: a shrink across the boot size while memory is
    /// still plugged. The balloon keeps its current target until then.
    AfterUnplug,
}

/// Device targets for one requested size, and their order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizePlan {
    /// virtio-mem requested_size (hotplugged bytes).
    pub hotplug_requested: u64,
    /// Balloon target in bytes, when a balloon exists.
    pub balloon_target: Option<u64>,
    /// When the balloon target is set.
    pub balloon_step: BalloonStep,
}

/// Why a requested size cannot be reached. `status` is the HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResizeError {
    /// Neither a hotplug region nor a balloon is configured.
    #[error(
        "the VM has no resizable memory: start it with --memory hotplug_size=SIZE or --balloon"
    )]
    NotResizable,
    /// Below boot size without a balloon.
    #[error("requested_size {requested} is below the boot memory size {boot}; shrinking below boot size needs --balloon")]
    BelowBoot {
        /// Requested.
        requested: u64,
        /// Boot size.
        boot: u64,
    },
    /// Above boot size without a hotplug region.
    #[error("requested_size {requested} is above the boot memory size {boot} and no hotplug region is configured (--memory hotplug_size=SIZE)")]
    NoHotplug {
        /// Requested.
        requested: u64,
        /// Boot size.
        boot: u64,
    },
    /// More than boot + hotplug.
    #[error("requested_size {requested} is above the maximum {max} (boot size + hotplug_size)")]
    AboveMax {
        /// Requested.
        requested: u64,
        /// Maximum.
        max: u64,
    },
    /// The hotplugged part is not whole blocks.
    #[error("requested_size {requested} minus the boot size {boot} must be a multiple of block_size {block}")]
    NotBlockMultiple {
        /// Requested.
        requested: u64,
        /// Boot size.
        boot: u64,
        /// Block size.
        block: u64,
    },
    /// The ballooned part is not whole pages.
    #[error("requested_size {requested} must be a multiple of {page} below the boot size")]
    NotPageMultiple {
        /// Requested.
        requested: u64,
        /// Page size.
        page: u64,
    },
    /// The requested size is zero.
    #[error("requested_size must be greater than zero")]
    Zero,
}

impl ResizeError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            ResizeError::NotResizable => 409,
            _ => 400,
        }
    }
}

/// Splits `requested` total guest memory into device targets, given the
/// bytes virtio-mem has plugged now (`plugged`).
pub fn plan_resize(
    requested: u64,
    limits: &MemoryLimits,
    plugged: u64,
) -> Result<ResizePlan, ResizeError> {
    let MemoryLimits {
        boot_size: boot,
        hotplug_size,
        block_size: block,
        balloon,
    } = *limits;
    if hotplug_size == 0 && !balloon {
        return Err(ResizeError::NotResizable);
    }
    if requested == 0 {
        return Err(ResizeError::Zero);
    }
    let balloon_target = |target: u64| balloon.then_some(target);
    if requested <= boot {
        if requested < boot && !balloon {
            return Err(ResizeError::BelowBoot { requested, boot });
        }
        if !requested.is_multiple_of(BALLOON_PAGE) {
            return Err(ResizeError::NotPageMultiple {
                requested,
                page: BALLOON_PAGE,
            });
        }
        let target = balloon_target(boot - requested);
        let inflates = target.is_some_and(|t| t > 0);
        return Ok(ResizePlan {
            hotplug_requested: 0,
            balloon_target: target,
            balloon_step: if inflates && plugged > 0 {
                BalloonStep::AfterUnplug
            } else {
                BalloonStep::Now
            },
        });
    }
    if hotplug_size == 0 {
        return Err(ResizeError::NoHotplug { requested, boot });
    }
    let max = boot + hotplug_size;
    if requested > max {
        return Err(ResizeError::AboveMax { requested, max });
    }
    let hotplug = requested - boot;
    if !hotplug.is_multiple_of(block) {
        return Err(ResizeError::NotBlockMultiple {
            requested,
            boot,
            block,
        });
    }
    Ok(ResizePlan {
        hotplug_requested: hotplug,
        balloon_target: balloon_target(0),
        balloon_step: BalloonStep::Now,
    })
}

/// What bounds a Dynamic Memory (hv-balloon) resize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmLimits {
    /// Boot memory.
    pub boot_size: u64,
    /// Hotplug region size.
    pub hotplug_size: u64,
    /// The guest's hot-add block (its memory block size, from the DM
    /// capabilities; 128 MiB until the guest reports it).
    pub hot_add_block: u64,
}

/// The hot-add block a Linux guest with less than 64 GiB of boot RAM uses.
pub const DEFAULT_HOT_ADD_BLOCK: u64 = 128 << 20;

/// Validates `requested` total guest memory for the Dynamic Memory device
/// and returns its target: any whole number of pages up to boot size (the
/// guest balloons from anywhere, hot-added memory included), and boot size
/// plus whole hot-add blocks above it.
pub fn plan_dm_resize(requested: u64, limits: &DmLimits) -> Result<u64, ResizeError> {
    let DmLimits {
        boot_size: boot,
        hotplug_size,
        hot_add_block: block,
    } = *limits;
    if requested == 0 {
        return Err(ResizeError::Zero);
    }
    if !requested.is_multiple_of(BALLOON_PAGE) {
        return Err(ResizeError::NotPageMultiple {
            requested,
            page: BALLOON_PAGE,
        });
    }
    let max = boot + hotplug_size;
    if requested > max {
        return Err(ResizeError::AboveMax { requested, max });
    }
    if requested > boot && !(requested - boot).is_multiple_of(block.max(1)) {
        return Err(ResizeError::NotBlockMultiple {
            requested,
            boot,
            block,
        });
    }
    Ok(requested)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn limits(hotplug: u64, balloon: bool) -> MemoryLimits {
        MemoryLimits {
            boot_size: 512 * MIB,
            hotplug_size: hotplug,
            block_size: 2 * MIB,
            balloon,
        }
    }

    #[test]
    fn grows_through_virtio_mem_and_shrinks_through_the_balloon() {
        let l = limits(4 * GIB, true);
        // Growing, from a ballooned guest too: the balloon target drops to
        // 0 at once (the VMM sets it before virtio-mem's size).
        assert_eq!(
            plan_resize(512 * MIB + GIB, &l, 0),
            Ok(ResizePlan {
                hotplug_requested: GIB,
                balloon_target: Some(0),
                balloon_step: BalloonStep::Now,
            })
        );
        assert_eq!(
            plan_resize(256 * MIB, &l, 0),
            Ok(ResizePlan {
                hotplug_requested: 0,
                balloon_target: Some(256 * MIB),
                balloon_step: BalloonStep::Now,
            })
        );
        assert_eq!(
            plan_resize(512 * MIB, &limits(4 * GIB, false), GIB),
            Ok(ResizePlan {
                hotplug_requested: 0,
                balloon_target: None,
                balloon_step: BalloonStep::Now,
            })
        );
    }

    #[test]
    fn a_shrink_across_boot_size_unplugs_before_the_balloon_inflates() {
        let l = limits(4 * GIB, true);
        // 1.5 GiB (1 GiB plugged) down to 384 MiB in one request: unplug
        // everything first, inflate 128 MiB once it is gone.
        assert_eq!(
            plan_resize(384 * MIB, &l, GIB),
            Ok(ResizePlan {
                hotplug_requested: 0,
                balloon_target: Some(128 * MIB),
                balloon_step: BalloonStep::AfterUnplug,
            })
        );
        // Nothing plugged (any more): the balloon inflates at once.
        assert_eq!(
            plan_resize(384 * MIB, &l, 0).map(|p| p.balloon_step),
            Ok(BalloonStep::Now)
        );
        // Down to exactly boot size: nothing to inflate, nothing to wait for.
        assert_eq!(
            plan_resize(512 * MIB, &l, GIB),
            Ok(ResizePlan {
                hotplug_requested: 0,
                balloon_target: Some(0),
                balloon_step: BalloonStep::Now,
            })
        );
        // Shrinking within the hotplugged part never waits.
        assert_eq!(
            plan_resize(GIB, &l, 2 * GIB).map(|p| p.balloon_step),
            Ok(BalloonStep::Now)
        );
    }

    #[test]
    fn dm_targets_are_pages_below_boot_and_blocks_above() {
        let l = DmLimits {
            boot_size: GIB,
            hotplug_size: 8 * GIB,
            hot_add_block: DEFAULT_HOT_ADD_BLOCK,
        };
        assert_eq!(plan_dm_resize(GIB - 512 * MIB, &l), Ok(512 * MIB));
        assert_eq!(plan_dm_resize(GIB - 4096, &l), Ok(GIB - 4096));
        assert_eq!(plan_dm_resize(2 * GIB, &l), Ok(2 * GIB));
        assert_eq!(plan_dm_resize(9 * GIB, &l), Ok(9 * GIB));
        assert_eq!(plan_dm_resize(0, &l), Err(ResizeError::Zero));
        assert!(matches!(
            plan_dm_resize(GIB + 1, &l),
            Err(ResizeError::NotPageMultiple { .. })
        ));
        assert!(matches!(
            plan_dm_resize(GIB + 64 * MIB, &l),
            Err(ResizeError::NotBlockMultiple { block, .. }) if block == DEFAULT_HOT_ADD_BLOCK
        ));
        assert!(matches!(
            plan_dm_resize(9 * GIB + 128 * MIB, &l),
            Err(ResizeError::AboveMax { .. })
        ));
    }

    #[test]
    fn refusals_say_why() {
        let l = limits(4 * GIB, false);
        assert_eq!(
            plan_resize(GIB, &limits(0, false), 0),
            Err(ResizeError::NotResizable)
        );
        assert_eq!(ResizeError::NotResizable.status(), 409);
        assert!(matches!(
            plan_resize(256 * MIB, &l, 0),
            Err(ResizeError::BelowBoot { .. })
        ));
        assert!(matches!(
            plan_resize(8 * GIB, &l, 0),
            Err(ResizeError::AboveMax { .. })
        ));
        assert!(matches!(
            plan_resize(512 * MIB + MIB, &l, 0),
            Err(ResizeError::NotBlockMultiple { .. })
        ));
        assert!(matches!(
            plan_resize(GIB, &limits(0, true), 0),
            Err(ResizeError::NoHotplug { .. })
        ));
        assert!(matches!(
            plan_resize(256 * MIB + 1, &limits(0, true), 0),
            Err(ResizeError::NotPageMultiple { .. })
        ));
        assert_eq!(plan_resize(0, &l, 0), Err(ResizeError::Zero));
        assert!(plan_resize(512 * MIB + 4 * GIB, &l, 0).is_ok());
    }
}
