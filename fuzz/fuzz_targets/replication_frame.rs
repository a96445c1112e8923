#![no_main]
//! cargo-fuzz target; the logic lives in `tandem_fuzz::replication_frame`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_fuzz::replication_frame(data));
