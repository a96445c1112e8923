//! One way to set up `tracing` in every binary: `RUST_LOG` wins, else the given default.

/// Initialises a stderr subscriber. Safe to call twice (the second call is ignored).
pub fn init(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
