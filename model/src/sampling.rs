//! Choosing the next token from logits, in the order Hugging Face `generate` applies its
//! processors: repetition penalty, then temperature, top-k and top-p, then a draw.
//! OpenAI's presence and frequency penalties, when set, come right after the
//! repetition penalty (before temperature, as vLLM applies them).
//! A temperature of 0 is greedy (argmax; the first index wins a tie, as `torch.argmax`).

use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::error::{Error, Result};

/// Sampling parameters of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (`None` or 0: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0: all).
    pub top_p: f32,
    /// Hugging Face repetition penalty over prompt and output tokens (1.0: off).
    pub repetition_penalty: f32,
    /// OpenAI's presence penalty, in [-2, 2]: subtracted once from the logit of every
    /// token the output already holds (0.0: off).
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty, in [-2, 2]: subtracted from a token's logit once per
    /// time the output already holds it (0.0: off).
    pub frequency_penalty: f32,
    /// Seed of the random draw; the same seed gives the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: 1.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks every value is in range, naming the first that is not.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Request(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Request(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(Error::Request(format!(
                "repetition_penalty must be a finite number > 0, got {}",
                self.repetition_penalty
            )));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(Error::Request(format!(
                    "{name} must be in [-2, 2], got {value}"
                )));
            }
        }
        Ok(())
    }

    /// Whether this is plain greedy decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// A seeded sampler for one sequence.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// The most alternatives a request may ask log probabilities for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The log probability of `token` under the model's distribution (the log-softmax of
/// the raw `logits`, before any penalty or temperature, as vLLM reports them) and the
/// `top` most likely tokens with theirs, most likely first (the lower id first on a
/// tie).
pub fn log_probs(logits: &[f32], token: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_norm = f64::from(max) + sum.ln();
    let logprob = |l: f32| (f64::from(l) - log_norm) as f32;
    let chosen = logits
        .get(token as usize)
        .map_or(f32::NEG_INFINITY, |&l| logprob(l));
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let top = top.min(order.len());
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if top > 0 && top < order.len() {
        order.select_nth_unstable_by(top - 1, by_logit);
    }
    order.truncate(top);
    order.sort_by(by_logit);
    let alternatives = order
        .into_iter()
        .map(|id| (id, logprob(logits[id as usize])))
        .collect();
    (chosen, alternatives)
}

/// Index of the largest value; the first one wins a tie; NaN never wins.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] || values[best].is_nan() {
            best = i;
        }
    }
    best
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Self { params, rng })
    }

    /// Picks the next token from `logits` (vocab,), given every token so far (prompt and
    /// output) for the repetition penalty, the output being `history[prompt_len..]`
    /// (for the presence and frequency penalties, which count output tokens only).
    pub fn sample(&mut self, logits: &[f32], history: &[u32], prompt_len: usize) -> u32 {
        let mut logits = logits.to_vec();
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &id in history {
                if let Some(s) = seen.get_mut(id as usize)
                    && !*s
                {
                    *s = true;
                    let l = &mut logits[id as usize];
                    *l = if *l < 0.0 {
                        *l * p.repetition_penalty
                    } else {
                        *l / p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            // OpenAI: logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty.
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &id in history.get(prompt_len..).unwrap_or_default() {
                *counts.entry(id).or_default() += 1;
            }
            for (id, count) in counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= count as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
        if p.is_greedy() {
            return argmax(&logits) as u32;
        }
        for l in logits.iter_mut() {
            *l /= p.temperature;
        }
        // Candidates sorted by logit, descending (stable: lower id first on ties).
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if let Some(k) = p.top_k.filter(|&k| k > 0) {
            order.truncate(k);
        }
        let max = logits[order[0]];
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] - max) as f64).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            // Keep tokens until the cumulative probability reaches top_p (at least one).
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, &pr) in probs.iter().enumerate() {
                cum += pr;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            order.truncate(keep);
            probs.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let draw: f64 = self.rng.random();
        let mut cum = 0.0;
        for (i, &pr) in probs.iter().enumerate() {
            cum += pr;
            if draw < cum {
                return order[i] as u32;
            }
        }
        order[order.len() - 1] as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(params(0.0)).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[], 0), 1);
    }

    #[test]
    fn repetition_penalty_discourages_seen_tokens() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0)
        })
        .unwrap();
        // Token 0 (3.0) is penalised to 1.5 < 2.0.
        assert_eq!(s.sample(&[3.0, 2.0], &[0], 0), 1);
        // Negative logits are multiplied, so a seen negative token gets worse.
        assert_eq!(s.sample(&[-1.0, -1.5], &[0, 0], 0), 1);
        // Ids outside the vocabulary are ignored.
        assert_eq!(s.sample(&[-1.0, -1.5], &[5000], 0), 0);
    }

    #[test]
    fn presence_and_frequency_penalties_count_output_tokens_only() {
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 0.5,
            ..params(0.0)
        })
        .unwrap();
        // Token 0 (3.0) is in the output twice: 3.0 - 2 × 0.5 = 2.0 < 2.5.
        assert_eq!(s.sample(&[3.0, 2.5], &[7, 0, 0], 1), 1);
        // The same tokens in the prompt are not penalised.
        assert_eq!(s.sample(&[3.0, 2.5], &[0, 0, 7], 2), 0);
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.6,
            ..params(0.0)
        })
        .unwrap();
        // Presence counts once however often: 3.0 - 0.6 = 2.4 < 2.5.
        assert_eq!(s.sample(&[3.0, 2.5], &[0, 0, 0], 0), 1);
        assert_eq!(s.sample(&[3.0, 2.0], &[0, 0, 0], 0), 0);
        // A negative penalty favours repeats; ids outside the vocabulary are ignored.
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: -1.0,
            ..params(0.0)
        })
        .unwrap();
        assert_eq!(s.sample(&[2.0, 2.5], &[0, 9000], 0), 0);
        let err = Sampler::new(SamplingParams {
            frequency_penalty: 2.5,
            ..params(0.0)
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("frequency_penalty"), "{err}");
    }

    #[test]
    fn log_probs_are_a_log_softmax_with_the_most_likely_first() {
        let logits = [1.0f32, 3.0, 3.0, -2.0, 0.5];
        let (chosen, top) = log_probs(&logits, 4, 3);
        let norm: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum::<f64>().ln();
        assert!((f64::from(chosen) - (0.5 - norm)).abs() < 1e-6);
        let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 2, 0], "ties go to the lower id");
        assert!((f64::from(top[2].1) - (1.0 - norm)).abs() < 1e-6);
        let total: f64 = logits.iter().map(|&l| (f64::from(l) - norm).exp()).sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert_eq!(log_probs(&logits, 0, 0).1, []);
        assert_eq!(log_probs(&logits, 0, 99).1.len(), 5);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(1.0)
            })
            .unwrap();
            (0..20)
                .map(|_| s.sample(&logits, &[], 0))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let mut k1 = Sampler::new(SamplingParams {
            top_k: Some(1),
            ..params(1.0)
        })
        .unwrap();
        assert_eq!(k1.sample(&logits, &[], 0), argmax(&logits) as u32);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // p ≈ [0.88, 0.12, ~0]: with top_p 0.5 only token 0 can be drawn.
        let logits = [4.0, 2.0, -20.0];
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.5,
            ..params(1.0)
        })
        .unwrap();
        assert!((0..100).all(|_| s.sample(&logits, &[], 0) == 0));
    }

    #[test]
    fn invalid_parameters_are_rejected_with_their_name() {
        let err = Sampler::new(params(-1.0)).unwrap_err().to_string();
        assert!(err.contains("temperature"), "{err}");
        let err = Sampler::new(SamplingParams {
            top_p: 0.0,
            ..params(1.0)
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("top_p"), "{err}");
    }
}
