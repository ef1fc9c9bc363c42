//! The host's wall clock (virtual in tests, so expiry logic stays testable).

use crate::Datetime;
use crate::bindings::wasi::clocks::wall_clock;

/// Now, as seconds and nanoseconds since the Unix epoch.
pub fn now() -> Datetime {
    let now = wall_clock::now();
    Datetime {
        seconds: now.seconds,
        nanoseconds: now.nanoseconds,
    }
}

/// Now, as whole seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    now().seconds
}

/// Parse an RFC 3339 / ISO 8601 UTC or offset timestamp (`2026-11-28T05:56:20Z`,
/// `2026-11-28T05:56:20.616518Z`, `2026-11-28T06:56:20+01:00`), as AWS STS, Vault
/// and Kubernetes send them. `None` for anything else (or a time before 1970).
pub fn parse_rfc3339(s: &str) -> Option<Datetime> {
    let b = s.trim().as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if !(1..=12).contains(&month)
        || !(1..=days_in_month).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut nanos: u32 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 9 {
                nanos = nanos * 10 + u32::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return None;
        }
        for _ in (i - start).min(9)..9 {
            nanos *= 10;
        }
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let (h, m) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if h > 23 || m > 59 {
                return None;
            }
            let o = h * 3600 + m * 60;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second.min(59) - offset;
    Some(Datetime {
        seconds: u64::try_from(secs).ok()?,
        nanoseconds: nanos,
    })
}

#[cfg(test)]
mod tests {
    use super::parse_rfc3339;

    #[test]
    fn rfc3339_timestamps() {
        let t = parse_rfc3339("2026-11-28T05:56:20.616518Z").unwrap();
        assert_eq!((t.seconds, t.nanoseconds), (1_795_845_380, 616_518_000));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z").unwrap().seconds, 0);
        assert_eq!(
            parse_rfc3339("2026-11-28T06:56:20+01:00").unwrap().seconds,
            1_795_845_380
        );
        assert_eq!(
            parse_rfc3339("2000-02-29T12:00:00Z").unwrap().seconds,
            951_825_600
        );
        for bad in [
            "",
            "2026-11-28",
            "2026-13-01T00:00:00Z",
            "2026-11-28T05:56:20",
            "1969-12-31T23:59:59Z",
            "2026-11-28T05:56:20.Z",
            "2026-11-28T05:56:20Zjunk",
            "२०२६-11-28T05:56:20Z",
            "99999999999999999999-01-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad).map(|t| t.seconds), None, "{bad}");
        }
    }
}
