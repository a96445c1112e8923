#![no_main]
//! cargo-fuzz target; the logic lives in `tandem_fuzz::fs_metadata_block`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_fuzz::fs_metadata_block(data));
