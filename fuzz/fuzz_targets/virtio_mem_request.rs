#![no_main]
//! libFuzzer entry of `virtio_mem_request`; the target and its invariants are in
//! `tidevm_fuzz::targets::virtio_mem_request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| tidevm_fuzz::targets::virtio_mem_request::run(data));
