#![no_main]
//! libFuzzer entry of `virtio_mmio`; the target and its invariants are in
//! `tidevm_fuzz::targets::virtio_mmio`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidevm_fuzz::targets::virtio_mmio::run(data));
