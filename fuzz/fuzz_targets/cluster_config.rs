#![no_main]
//! cargo-fuzz target; the logic lives in `tandem_fuzz::cluster_config`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tandem_fuzz::cluster_config(data));
