//! A verify request → the share of packs to read: none (structure only) or 1 to 100 %.

use mover_engine::{Error, Result};

/// How much of the repository a verify reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyPlan {
    /// `None`: structure only; else the share of packs downloaded and verified.
    pub read_percent: Option<u32>,
}

impl VerifyPlan {
    /// A request's `read_data_percent`: 0 structure only, 1 to 100 that share of the packs.
    pub fn from_percent(p: u32) -> Result<Self> {
        match p {
            0 => Ok(Self { read_percent: None }),
            1..=100 => Ok(Self { read_percent: Some(p) }),
            _ => Err(Error::invalid(format!("read_data_percent {p} must be 0 to 100"))),
        }
    }

    /// The CLI's `--read-data` and `--read-data-subset N%`.
    pub fn from_flags(read_data: bool, subset: Option<&str>) -> Result<Self> {
        match subset {
            Some(s) => {
                let n: u32 = s.trim_end_matches('%').parse().map_err(|_| Error::invalid(format!("--read-data-subset '{s}' is not a percentage like 10%")))?;
                if n == 0 {
                    return Err(Error::invalid(format!("--read-data-subset '{s}' must be between 1% and 100%")));
                }
                Self::from_percent(n).map_err(|_| Error::invalid(format!("--read-data-subset '{s}' must be between 1% and 100%")))
            }
            None => Self::from_percent(if read_data { 100 } else { 0 }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_from_a_request_and_from_flags_follow_one_rule() {
        assert_eq!(VerifyPlan::from_percent(0).unwrap().read_percent, None);
        assert_eq!(VerifyPlan::from_percent(100).unwrap().read_percent, Some(100));
        assert!(VerifyPlan::from_percent(101).is_err());
        assert_eq!(VerifyPlan::from_flags(true, None).unwrap().read_percent, Some(100));
        assert_eq!(VerifyPlan::from_flags(false, None).unwrap().read_percent, None);
        assert_eq!(VerifyPlan::from_flags(false, Some("10%")).unwrap().read_percent, Some(10));
        for bad in ["0%", "101%", "ten"] {
            assert!(VerifyPlan::from_flags(false, Some(bad)).is_err(), "{bad}");
        }
    }
}
