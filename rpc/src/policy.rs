//! Delivery policies of messages: when a message whose delivery failed is tried again, and
//! when its schedule ends (the message is then dead-lettered for an operator). The
//! coordinator applies them; ferrata-proxy checks a policy where a message is written.
//!
//! A policy is named (`wechat`, `alipay`, `standard-webhooks`, `dtm`, `dtm:<first wait>`) or
//! an explicit list of waits (`15s,1m,10m`). Its attempts are counted from the first one: after a failure `e`
//! after the first attempt, the next is the schedule's first attempt time after `e` (so a
//! coordinator restarted meanwhile keeps the schedule), at least as late as the receiver's
//! `Retry-After`, plus up to a tenth of the wait as jitter. Once the next attempt would fall
//! after the schedule's last one (its window), the schedule has ended.

use std::time::Duration;

/// The policy of a message that names none.
pub const DEFAULT: &str = "standard-webhooks";

/// The most waits an explicit list may have.
const MAX_WAITS: usize = 50;
/// The longest single wait, and the longest window, an explicit list may have.
const MAX_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_WINDOW: Duration = Duration::from_secs(30 * 24 * 3600);

/// When the attempts of a message are due.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Schedule {
    /// The waits between attempts, in order: the schedule ends after the last.
    Waits(Vec<Duration>),
    /// Waits doubling from `first`, each at most `max_wait`, for `window` after the first
    /// attempt.
    Doubling {
        first: Duration,
        max_wait: Duration,
        window: Duration,
    },
}

/// A delivery policy, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    schedule: Schedule,
}

const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

impl Policy {
    /// `spec`: a policy's name, or waits separated by commas (`500ms`, `15s`, `3m`, `2h`,
    /// `1d`); empty: [`DEFAULT`]. `Err` says what is wrong.
    pub fn parse(spec: &str) -> Result<Policy, String> {
        let waits = |list: &[Duration]| Schedule::Waits(list.to_vec());
        let schedule = match spec.trim() {
            "" => return Policy::parse(DEFAULT),
            // WeChat Pay's notification retries: 15 of them within 24 h 4 m.
            "wechat" => waits(&[
                15 * SECOND,
                15 * SECOND,
                30 * SECOND,
                3 * MINUTE,
                10 * MINUTE,
                20 * MINUTE,
                30 * MINUTE,
                30 * MINUTE,
                30 * MINUTE,
                60 * MINUTE,
                3 * HOUR,
                3 * HOUR,
                3 * HOUR,
                6 * HOUR,
                6 * HOUR,
            ]),
            // Alipay's: 8 notifications within about 25 h.
            "alipay" => waits(&[
                4 * MINUTE,
                10 * MINUTE,
                10 * MINUTE,
                HOUR,
                2 * HOUR,
                6 * HOUR,
                15 * HOUR,
            ]),
            // The Standard Webhooks specification's example schedule, about 3 days.
            "standard-webhooks" => waits(&[
                5 * SECOND,
                5 * MINUTE,
                30 * MINUTE,
                2 * HOUR,
                5 * HOUR,
                10 * HOUR,
                14 * HOUR,
                20 * HOUR,
                24 * HOUR,
            ]),
            // DTM's: 10 s doubling (DTM never stops; this stops after 3 days).
            "dtm" => return Ok(Policy::doubling(10 * SECOND)),
            // DTM's with its `retry_interval`: doubling from it.
            dtm if dtm.starts_with("dtm:") => {
                let first = parse_duration(&dtm[4..]).map_err(|why| format!("policy {dtm:?}: {why}"))?;
                if first.is_zero() || first > 24 * HOUR {
                    return Err(format!(
                        "policy {dtm:?}: the first wait must be above 0 and at most a day"
                    ));
                }
                return Ok(Policy::doubling(first));
            }
            list => {
                let parsed = list
                    .split(',')
                    .map(|w| parse_duration(w.trim()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|why| {
                        format!(
                            "policy {list:?}: {why}; name one of wechat, alipay, standard-webhooks, dtm, or list waits \
                             such as \"15s,1m,10m\""
                        )
                    })?;
                if parsed.len() > MAX_WAITS {
                    return Err(format!(
                        "policy {list:?} lists {} waits; at most {MAX_WAITS}",
                        parsed.len()
                    ));
                }
                if parsed.iter().any(|w| w.is_zero() || *w > MAX_WAIT) {
                    return Err(format!("policy {list:?}: each wait must be above 0 and at most 7 days"));
                }
                if parsed.iter().sum::<Duration>() > MAX_WINDOW {
                    return Err(format!("policy {list:?}: the waits add up to more than 30 days"));
                }
                Schedule::Waits(parsed)
            }
        };
        Ok(Policy { schedule })
    }

    /// Doubling waits from `first` (DTM's `retry_interval`), at most an hour (or `first`)
    /// each, for 3 days.
    fn doubling(first: Duration) -> Policy {
        Policy {
            schedule: Schedule::Doubling {
                first,
                max_wait: HOUR.max(first),
                window: 72 * HOUR,
            },
        }
    }

    /// The wait before the next attempt, after one failed `elapsed` after the first attempt,
    /// at least `retry_after`; `None` once the schedule has ended. `jitter` (0 to 1) adds
    /// that share of a tenth of the wait.
    pub fn next_wait(&self, elapsed: Duration, retry_after: Option<Duration>, jitter: f64) -> Option<Duration> {
        let (due, end) = self.next_due(elapsed)?;
        // A Retry-After past the window still gets the window's last attempt.
        let due = retry_after.map_or(due, |r| due.max(elapsed.saturating_add(r)).min(end));
        // Jitter never skips the attempt after this one, nor passes the window's end.
        let latest = self.next_due(due).map_or(end, |(next, _)| next).min(end);
        let wait = due - elapsed;
        let jittered = due + wait.mul_f64(jitter.clamp(0.0, 1.0) / 10.0);
        Some(jittered.min(latest).max(due) - elapsed)
    }

    /// The first attempt time after `elapsed`, and the last the schedule allows.
    fn next_due(&self, elapsed: Duration) -> Option<(Duration, Duration)> {
        match &self.schedule {
            Schedule::Waits(waits) => {
                let end: Duration = waits.iter().sum();
                let mut at = Duration::ZERO;
                waits.iter().find_map(|w| {
                    at += *w;
                    (at > elapsed).then_some((at, end))
                })
            }
            Schedule::Doubling {
                first,
                max_wait,
                window,
            } => {
                let (mut at, mut wait) = (Duration::ZERO, *first);
                while at <= elapsed {
                    at += wait;
                    wait = (wait * 2).min(*max_wait);
                }
                (at <= *window).then_some((at, *window))
            }
        }
    }
}

/// `500ms`, `15s`, `3m`, `2h`, `1d`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a wait such as 15s"))?;
    let unit = match unit {
        "ms" => Duration::from_millis(1),
        "s" => SECOND,
        "m" => MINUTE,
        "h" => HOUR,
        "d" => 24 * HOUR,
        _ => return Err(format!("{text:?} has no unit of ms, s, m, h or d")),
    };
    unit.checked_mul(u32::try_from(n).map_err(|_| format!("{text:?} is too long"))?)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn named_schedules_span_their_published_windows() {
        let end = |name: &str| match Policy::parse(name).unwrap().schedule {
            Schedule::Waits(w) => (w.len(), w.iter().sum::<Duration>()),
            Schedule::Doubling { window, .. } => (0, window),
        };
        assert_eq!(end("wechat"), (15, secs(24 * 3600 + 4 * 60)));
        assert_eq!(end("alipay"), (7, secs(24 * 3600 + 24 * 60)));
        assert_eq!(end("standard-webhooks"), (9, secs(75 * 3600 + 35 * 60 + 5)));
        assert_eq!(end(""), end("standard-webhooks"));
        assert_eq!(end("dtm"), (0, secs(72 * 3600)));
    }

    #[test]
    fn the_next_attempt_follows_the_schedule_from_the_first() {
        let p = Policy::parse("15s,15s,30s").unwrap();
        // Attempts at 0, 15, 30 and 60 s after the first.
        assert_eq!(p.next_wait(secs(0), None, 0.0), Some(secs(15)));
        assert_eq!(p.next_wait(secs(16), None, 0.0), Some(secs(14)));
        assert_eq!(p.next_wait(secs(40), None, 0.0), Some(secs(20)));
        assert_eq!(p.next_wait(secs(60), None, 0.0), None, "the last attempt failed");
        // Jitter adds at most a tenth of the wait.
        assert_eq!(p.next_wait(secs(0), None, 1.0), Some(Duration::from_millis(16_500)));
    }

    #[test]
    fn retry_after_is_honoured_within_the_window() {
        let p = Policy::parse("10s,10s,10s").unwrap();
        assert_eq!(p.next_wait(secs(0), Some(secs(25)), 0.0), Some(secs(25)));
        assert_eq!(p.next_wait(secs(0), Some(secs(2)), 0.0), Some(secs(10)));
        assert_eq!(
            p.next_wait(secs(20), Some(secs(20)), 0.0),
            Some(secs(10)),
            "past the window: its last attempt"
        );
        assert_eq!(
            p.next_wait(secs(30), Some(secs(1)), 0.0),
            None,
            "the last attempt failed"
        );
        assert_eq!(p.next_wait(secs(0), Some(Duration::MAX), 0.0), Some(secs(30)));
    }

    #[test]
    fn jitter_never_skips_an_attempt_nor_passes_the_window() {
        let p = Policy::parse("1h,1m").unwrap();
        // Due at 60 m, the next at 61 m: a tenth of an hour of jitter stops at 61 m.
        assert_eq!(p.next_wait(secs(0), None, 1.0), Some(secs(3660)));
        assert_eq!(
            p.next_wait(secs(3600), None, 1.0),
            Some(secs(60)),
            "the last: no later than the end"
        );
    }

    #[test]
    fn doubling_waits_stop_at_their_window() {
        let p = Policy::parse("dtm").unwrap();
        assert_eq!(Policy::parse("dtm:10s").unwrap(), p);
        assert_eq!(
            Policy::parse("dtm:2s").unwrap().next_wait(secs(0), None, 0.0),
            Some(secs(2))
        );
        assert_eq!(p.next_wait(secs(0), None, 0.0), Some(secs(10)));
        assert_eq!(p.next_wait(secs(10), None, 0.0), Some(secs(20)));
        assert_eq!(p.next_wait(secs(30), None, 0.0), Some(secs(40)));
        assert_eq!(p.next_wait(secs(72 * 3600), None, 0.0), None);
    }

    #[test]
    fn bad_policies_say_what_is_wrong() {
        for (spec, says) in [
            ("weekly", "name one of"),
            ("15x", "no unit"),
            ("15s,,1m", "not a wait"),
            ("0s", "above 0"),
            ("8d", "at most 7 days"),
            ("7d,7d,7d,7d,7d", "30 days"),
            ("dtm:2d", "at most a day"),
        ] {
            let e = Policy::parse(spec).unwrap_err();
            assert!(e.contains(says), "{spec}: {e}");
        }
        assert_eq!(
            Policy::parse("500ms, 2m").unwrap().schedule,
            Schedule::Waits(vec![Duration::from_millis(500), secs(120)])
        );
    }
}
