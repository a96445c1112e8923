//! Human sizes in the config ("512MiB", "1G", "4096").

/// Parses a size with an optional binary suffix (K, M, G, T with optional "iB"/"B").
/// Suffixes are powers of 1024, as in DRBD's and LVM's tools.
pub fn parse_size_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty size".into());
    }
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err(format!("size {text:?} must start with a number"));
    }
    let number: u64 = t[..digits_end]
        .parse()
        .map_err(|_| format!("size {text:?} is too large"))?;
    let suffix = t[digits_end..].trim().to_ascii_lowercase();
    let shift = match suffix.as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("unknown size suffix {other:?} in {text:?}")),
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {text:?} overflows"))
}

/// Formats bytes for people: "1.5 GiB".
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_size_bytes("1K").unwrap(), 1024);
        assert_eq!(parse_size_bytes("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size_bytes("2G").unwrap(), 2 << 30);
        assert!(parse_size_bytes("1X").is_err());
        assert!(parse_size_bytes("G").is_err());
        assert!(parse_size_bytes("99999999999999999999T").is_err());
    }

    #[test]
    fn formats() {
        assert_eq!(format_bytes(10), "10 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
    }
}
