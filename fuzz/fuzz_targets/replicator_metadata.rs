#![no_main]
//! cargo-fuzz target; the logic lives in `tandem_fuzz::replicator_metadata`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_fuzz::replicator_metadata(data));
