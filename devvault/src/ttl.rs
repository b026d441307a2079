//! Vault's TTL arithmetic (`CalculateTTL`, vault-api.md §5.5) and its way of
//! printing durations in warnings.

use chrono::{DateTime, Utc};

/// Vault's system default and max TTL: 768h.
pub const SYSTEM_TTL: i64 = 768 * 3600;

#[derive(Debug, Clone, Copy, Default)]
pub struct TtlInput {
    pub increment: i64,
    pub backend_ttl: i64,
    pub backend_max: i64,
    pub period: i64,
    pub explicit_max: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TtlResult {
    pub ttl: i64,
    pub warnings: Vec<String>,
}

/// `CalculateTTL` with mount defaults D = M = 768h. Errors with Vault's text
/// when the max TTL has already passed.
pub fn calculate(input: TtlInput, start: DateTime<Utc>, now: DateTime<Utc>) -> Result<TtlResult, String> {
    let mut warnings = Vec::new();
    let mut max_ttl = SYSTEM_TTL;
    if input.backend_max > 0 && input.backend_max < max_ttl {
        max_ttl = input.backend_max;
    }
    if input.explicit_max > 0 && input.explicit_max < max_ttl {
        max_ttl = input.explicit_max;
    }
    let (mut ttl, limit) = if input.period > 0 {
        let mut period = input.period;
        if period > max_ttl {
            warnings.push(format!(
                "period of \"{}\" exceeded the effective max_ttl of \"{}\"; period value is capped accordingly",
                human(period),
                human(max_ttl)
            ));
            period = max_ttl;
        }
        let limit = (input.explicit_max > 0).then(|| start + chrono::Duration::seconds(input.explicit_max));
        (period, limit)
    } else {
        let ttl = if input.increment > 0 {
            input.increment
        } else if input.backend_ttl > 0 {
            input.backend_ttl
        } else {
            SYSTEM_TTL
        };
        (ttl, Some(start + chrono::Duration::seconds(max_ttl)))
    };
    if let Some(limit) = limit {
        let remaining_ms = (limit - now).num_milliseconds();
        if remaining_ms <= 0 {
            return Err("past the max TTL, cannot renew".to_string());
        }
        // Whole seconds, rounded: a renewal a few ms after issue still has
        // the full max TTL left, as OpenBao reports it.
        let remaining = (remaining_ms + 500) / 1000;
        if ttl > remaining {
            warnings.push(format!(
                "TTL of \"{}\" exceeded the effective max_ttl of \"{}\"; TTL value is capped accordingly",
                human(ttl),
                human(remaining)
            ));
            ttl = remaining;
        }
    }
    Ok(TtlResult { ttl, warnings })
}

/// Go's `time.Duration.String()` for whole seconds, with Vault's trimming of
/// zero units (`1h0m0s` → `1h`, `20m0s` → `20m`, `1h0m5s` → `1h5s`).
pub fn human(secs: i64) -> String {
    if secs == 0 {
        return "0s".to_string();
    }
    let neg = secs < 0;
    let s = secs.abs();
    let (h, m, sec) = (s / 3600, (s % 3600) / 60, s % 60);
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    if h > 0 {
        out.push_str(&format!("{h}h{m}m{sec}s"));
    } else if m > 0 {
        out.push_str(&format!("{m}m{sec}s"));
    } else {
        out.push_str(&format!("{sec}s"));
    }
    if out.ends_with("m0s") {
        out.truncate(out.len() - 2);
    }
    if let Some(idx) = out.find("h0m") {
        out.replace_range(idx + 1..idx + 3, "");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(s, 0).unwrap()
    }

    #[test]
    fn human_matches_go() {
        assert_eq!(human(3600), "1h");
        assert_eq!(human(1200), "20m");
        assert_eq!(human(5400), "1h30m");
        assert_eq!(human(725), "12m5s");
        assert_eq!(human(3605), "1h5s");
        assert_eq!(human(45), "45s");
        assert_eq!(human(0), "0s");
    }

    #[test]
    fn increment_capped_by_backend_max() {
        let input = TtlInput { increment: 3600, backend_ttl: 60, backend_max: 1200, ..Default::default() };
        let r = calculate(input, at(1000), at(1000)).unwrap();
        assert_eq!(r.ttl, 1200);
        assert_eq!(
            r.warnings,
            vec!["TTL of \"1h\" exceeded the effective max_ttl of \"20m\"; TTL value is capped accordingly"]
        );
    }

    #[test]
    fn renewal_counts_from_issue_time() {
        let input = TtlInput { increment: 4, backend_ttl: 4, backend_max: 12, ..Default::default() };
        let r = calculate(input, at(1000), at(1010)).unwrap();
        assert_eq!(r.ttl, 2);
        assert!(calculate(input, at(1000), at(1012)).is_err());
    }

    #[test]
    fn defaults_to_system_ttl() {
        let r = calculate(TtlInput::default(), at(0), at(0)).unwrap();
        assert_eq!(r.ttl, SYSTEM_TTL);
        assert!(r.warnings.is_empty());
    }

    #[test]
    fn period_ignores_max_without_explicit() {
        let input = TtlInput { period: 60, backend_max: 30, ..Default::default() };
        let r = calculate(input, at(0), at(1000)).unwrap();
        assert_eq!(r.ttl, 30);
        assert_eq!(r.warnings.len(), 1);
    }
}
