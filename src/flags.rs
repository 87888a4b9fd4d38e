//! Value parsers for the numeric flags of every subcommand. clap runs them as it parses, so a
//! bad value ends with clap's own error, which names the flag, the value and the accepted
//! range (`error: invalid value 'NaN' for '--lr <LR>': must be a finite number ≥ 0`), and
//! exit status 2, before any model or data is opened.
//!
//! The ranges follow the reference tools: PyTorch's AdamW checks (lr, eps and weight decay
//! ≥ 0, betas in [0, 1)), HF `generate`'s (temperature and repetition penalty > 0, top-p in
//! (0, 1]), open_clip's (counts ≥ 1).

use std::str::FromStr;

/// A float parsed as its own type, so that `1e39` is out of range for an f32 flag.
pub trait Float: FromStr + Copy + Into<f64> {}
impl Float for f32 {}
impl Float for f64 {}

fn float_in<T: Float>(s: &str, ok: impl Fn(f64) -> bool, range: &str) -> Result<T, String> {
    let value: T = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number; expected a finite number{range}"))?;
    let v: f64 = value.into();
    if v.is_finite() && ok(v) {
        Ok(value)
    } else {
        Err(format!("must be a finite number{range}"))
    }
}

/// Any finite number.
pub fn finite<T: Float>(s: &str) -> Result<T, String> {
    float_in(s, |_| true, "")
}

/// A finite number > 0.
pub fn positive<T: Float>(s: &str) -> Result<T, String> {
    float_in(s, |v| v > 0.0, " > 0")
}

/// A finite number ≥ 0.
pub fn non_negative<T: Float>(s: &str) -> Result<T, String> {
    float_in(s, |v| v >= 0.0, " ≥ 0")
}

/// A fraction or a probability: in [0, 1].
pub fn unit_interval<T: Float>(s: &str) -> Result<T, String> {
    float_in(s, |v| (0.0..=1.0).contains(&v), " in [0, 1]")
}

/// A decay coefficient (Adam's betas, an EMA momentum, label smoothing): in [0, 1).
pub fn below_one<T: Float>(s: &str) -> Result<T, String> {
    float_in(s, |v| (0.0..1.0).contains(&v), " in [0, 1)")
}

/// A probability mass to keep (top-p): in (0, 1].
pub fn mass<T: Float>(s: &str) -> Result<T, String> {
    float_in(s, |v| v > 0.0 && v <= 1.0, " in (0, 1]")
}

/// Text that must not be empty (a stop string).
pub fn non_empty(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s.to_string())
    }
}

/// A size or a count where 0 would mean nothing: an integer ≥ 1.
pub fn count<T: FromStr + PartialOrd + From<u8>>(s: &str) -> Result<T, String> {
    at_least(s, 1)
}

/// A count of at least two (a contrastive batch).
pub fn at_least_two<T: FromStr + PartialOrd + From<u8>>(s: &str) -> Result<T, String> {
    at_least(s, 2)
}

fn at_least<T: FromStr + PartialOrd + From<u8>>(s: &str, min: u8) -> Result<T, String> {
    let value: T = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number ≥ {min}"))?;
    if value >= T::from(min) {
        Ok(value)
    } else {
        Err(format!("must be at least {min}"))
    }
}

/// Most data-loading threads: far more than any machine has cores, and few enough that
/// spawning them cannot exhaust the process's threads.
pub const MAX_WORKERS: usize = 256;

/// `--workers`: data-loading threads, 1 to [`MAX_WORKERS`].
pub fn workers(s: &str) -> Result<usize, String> {
    let n: usize = count(s)?;
    if n <= MAX_WORKERS {
        Ok(n)
    } else {
        Err(format!("must be at most {MAX_WORKERS}"))
    }
}

/// `--dtype`: a name [`zoo_models::device::parse_dtype`] knows, checked as the flag is parsed.
pub fn dtype(s: &str) -> Result<String, String> {
    zoo_models::device::parse_dtype(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// `--device`: `cpu`, `cuda`, `cuda:N` or `metal`. Opening it waits for the command, since a
/// device that is not there is an error of the machine, not of the flag.
pub fn device(s: &str) -> Result<String, String> {
    let spec = s.trim().to_ascii_lowercase();
    let ordinal_ok = spec
        .strip_prefix("cuda:")
        .is_none_or(|n| n.parse::<usize>().is_ok());
    if matches!(spec.as_str(), "cpu" | "cuda" | "metal")
        || (spec.starts_with("cuda:") && ordinal_ok)
    {
        Ok(s.to_string())
    } else {
        Err("expected cpu, cuda, cuda:N or metal".into())
    }
}

/// `--dataset-type`: a name [`zoo_trainers::data::DatasetType`] knows.
pub fn dataset_type(s: &str) -> Result<String, String> {
    s.parse::<zoo_trainers::data::DatasetType>()
        .map(|_| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_are_finite_and_in_range() {
        assert_eq!(positive::<f64>("0.5"), Ok(0.5));
        assert!(positive::<f64>("0").is_err());
        assert!(positive::<f64>("NaN").is_err());
        assert!(positive::<f64>("inf").is_err());
        assert!(positive::<f32>("1e39").is_err(), "overflows f32");
        assert!(non_negative::<f64>("-1e-9").is_err());
        assert_eq!(non_negative::<f64>("0"), Ok(0.0));
        assert!(below_one::<f64>("1").is_err());
        assert_eq!(below_one::<f64>("0"), Ok(0.0));
        assert_eq!(unit_interval::<f64>("1"), Ok(1.0));
        assert!(unit_interval::<f64>("1.01").is_err());
        assert!(mass::<f32>("0").is_err());
        assert_eq!(mass::<f32>("1"), Ok(1.0));
        assert!(finite::<f32>("abc").unwrap_err().contains("not a number"));
    }

    #[test]
    fn counts_start_at_one() {
        assert_eq!(count::<usize>("3"), Ok(3));
        assert!(count::<usize>("0").unwrap_err().contains("at least 1"));
        assert!(count::<u64>("-1").is_err());
        assert!(at_least_two::<usize>("1")
            .unwrap_err()
            .contains("at least 2"));
        assert!(device("cuda:x").is_err());
        assert!(device("gpu").is_err());
        assert_eq!(device("cuda:1").as_deref(), Ok("cuda:1"));
        assert!(dtype("f8").is_err());
        assert!(workers("100000").unwrap_err().contains("at most 256"));
    }
}
