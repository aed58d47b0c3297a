//! Fuzz targets of tidevm (cargo-fuzz, libFuzzer).
//!
//! Every parser of untrusted bytes has a target: what the guest writes
//! (virtio requests, descriptor chains, virtio-mmio registers, vsock packets; with the
//! `hyperv` feature, VMBus and Dynamic Memory messages), what API clients
//! send, and the command line. The logic of each target lives in
//! [`targets`] as `run(data)`, with its invariants stated at the top of
//! its module; the binaries in `fuzz_targets/` only hand libFuzzer's
//! input to it. The seed corpus in `corpus/<target>/` is what each
//! module's `seeds()` returns (see the `corpus` test).

#![allow(clippy::cast_possible_truncation)] // Fuzz bytes are cut to size on purpose.

pub mod devices;
pub mod guest;
pub mod input;
pub mod targets;

/// A fuzz target: its name (the binary and corpus directory), its entry
/// point and its seeds.
pub struct Target {
    /// Name of the binary and of its corpus directory.
    pub name: &'static str,
    /// Runs one input; panics when an invariant breaks.
    pub run: fn(&[u8]),
    /// The seed corpus.
    pub seeds: fn() -> Vec<Vec<u8>>,
}

macro_rules! target {
    ($($path:ident)::+) => {
        Target {
            name: target!(@last $($path)::+),
            run: targets::$($path)::+::run,
            seeds: targets::$($path)::+::seeds,
        }
    };
    (@last $head:ident :: $($rest:ident)::+) => { target!(@last $($rest)::+) };
    (@last $name:ident) => { stringify!($name) };
}

/// Every target this build has.
pub fn all_targets() -> Vec<Target> {
    vec![
        target!(virtio_mem_request),
        target!(virtio_mem_queue),
        target!(balloon_pfns),
        target!(balloon_stats),
        target!(balloon_queue),
        target!(blk_request),
        target!(blk_queue),
        target!(virtio_mmio),
        target!(api_request),
        target!(api_http),
        target!(ch_api_body),
        target!(cli_options),
        target!(vsock_packets),
        target!(hyperv::vmbus_message),
        target!(hyperv::vmbus_post_message),
        target!(hyperv::vmbus_gpadl),
        target!(hyperv::vmbus_ring),
        target!(hyperv::vmbus_server),
        target!(hyperv::dm_message),
        target!(hyperv::dm_protocol),
    ]
}

#[cfg(test)]
mod corpus {
    //! The committed seed corpus is what `seeds()` returns, and every seed
    //! (and every committed crash reproducer) passes its target.
    //! `TIDEVM_WRITE_CORPUS=1 cargo test` rewrites the corpus.

    use std::path::PathBuf;

    fn dir(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(name)
    }

    #[test]
    fn seeds_match_the_corpus_and_pass() {
        let write = std::env::var_os("TIDEVM_WRITE_CORPUS").is_some();
        for t in super::all_targets() {
            let seeds = (t.seeds)();
            assert!(!seeds.is_empty(), "{} has no seeds", t.name);
            let d = dir(t.name);
            if write {
                // Only the seeds are rewritten; committed crash reproducers stay.
                std::fs::create_dir_all(&d).expect("corpus dir");
                for entry in std::fs::read_dir(&d).expect("corpus dir").flatten() {
                    if entry.file_name().to_string_lossy().starts_with("seed-") {
                        std::fs::remove_file(entry.path()).expect("remove old seed");
                    }
                }
            }
            for (i, seed) in seeds.iter().enumerate() {
                let path = d.join(format!("seed-{i:02}"));
                if write {
                    std::fs::write(&path, seed).expect("write seed");
                }
                let on_disk = std::fs::read(&path).unwrap_or_else(|e| {
                    panic!("{}: {e} (TIDEVM_WRITE_CORPUS=1 writes it)", path.display())
                });
                assert_eq!(&on_disk, seed, "{} is stale", path.display());
                eprintln!("running {}", path.display());
                (t.run)(seed);
            }
        }
    }
}
