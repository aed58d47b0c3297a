#![no_main]
//! libFuzzer entry of `virtio_mem_queue`; the target and its invariants are in
//! `tidevm_fuzz::targets::virtio_mem_queue`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidevm_fuzz::targets::virtio_mem_queue::run(data));
