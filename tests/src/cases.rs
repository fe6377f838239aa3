//! The conformance case set as measurements: each case runs on a loaded [`SamplingClient`] and
//! returns numbers (max |Δ logprob|, agreeing tokens, mismatches) instead of asserting, so the
//! same cases feed the test suite and `cargo xtask conformance`, which tabulates them per backend,
//! compares them with `tests/data/conformance-baseline.json` and writes a JSON report.
//!
//! Bounds are named per precision ([`Tolerances::for_dtype`]): f32 is held to 1e-3 against the
//! transformers goldens; bf16/f16 get loose bounds that still catch a wrong kernel or KV cache.

use std::collections::BTreeMap;

use infermux::{BackendKind, DType, ModelInput, SampleResponse, SamplingClient, SamplingParams};
use serde::{Deserialize, Serialize};

use crate::{GoldenCase, Goldens};

/// Tokens of every greedy continuation compared with the goldens.
pub const GREEDY_TOKENS: usize = 32;
/// Requests in the busy batch of the batch-size invariance and reproducibility cases.
pub const BUSY_BATCH: usize = 16;

/// Named bounds of one precision.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Tolerances {
    /// Name of the set (`f32`, or `bf16/f16`).
    pub name: &'static str,
    /// Max |Δ logprob| per token against the transformers goldens (f32 reference).
    pub reference: f64,
    /// Max |Δ logprob| per token between two backends at this precision.
    pub pairwise: f64,
    /// Max |Δ| between a sampled token's logprob and `compute_logprobs` of the same sequence.
    pub sample_vs_score: f64,
    /// Max |Δ logprob| of one sequence at batch 1 vs inside a batch of [`BUSY_BATCH`].
    pub batch_invariance: f64,
    /// Fewest leading greedy tokens that must equal the goldens' (of [`GREEDY_TOKENS`]).
    pub greedy_min_agree: usize,
}

impl Tolerances {
    /// f32: the reference precision, held tight.
    pub const F32: Tolerances = Tolerances {
        name: "f32",
        reference: 1e-3,
        pairwise: 1e-3,
        sample_vs_score: 1e-4,
        batch_invariance: 1e-4,
        greedy_min_agree: GREEDY_TOKENS,
    };
    /// bf16 and f16: an 8-bit (bf16) mantissa moves logprobs by tenths; a wrong kernel or a
    /// misplaced KV entry moves them by whole units. Near-ties may flip greedy tokens early.
    pub const LOOSE: Tolerances = Tolerances {
        name: "bf16/f16",
        reference: 1.0,
        pairwise: 1.0,
        sample_vs_score: 0.25,
        batch_invariance: 0.25,
        greedy_min_agree: 1,
    };

    /// The set for `dtype`.
    pub fn for_dtype(dtype: DType) -> Tolerances {
        match dtype {
            DType::F32 => Self::F32,
            DType::Bf16 | DType::F16 => Self::LOOSE,
        }
    }
}

/// Whether larger or smaller values of a measurement are better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    /// Errors and mismatch counts.
    Lower,
    /// Agreement counts.
    Higher,
}

/// One measured outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// `candle`, or `candle~torch` for a pairwise comparison.
    pub backend: String,
    /// The case family (`reference_logprobs`, `greedy_agreement`, …).
    pub check: String,
    /// The instance (a golden prompt's name, `score`, `decode`, …).
    pub case: String,
    /// The measurement.
    pub value: f64,
    /// Its bound.
    pub limit: f64,
    /// Direction of `value`.
    pub better: Better,
    /// Whether `value` is within `limit`.
    pub pass: bool,
    /// Extra facts for a human (where the worst difference was, …).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl Outcome {
    /// `backend/check/case`: the key of this outcome in the baseline.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.backend, self.check, self.case)
    }

    /// An outcome whose `value` must not exceed `limit`.
    pub fn at_most(backend: &str, check: &str, case: &str, value: f64, limit: f64) -> Self {
        Self {
            backend: backend.into(),
            check: check.into(),
            case: case.into(),
            value,
            limit,
            better: Better::Lower,
            pass: value <= limit, // NaN fails
            detail: String::new(),
        }
    }

    /// An outcome whose `value` must reach `limit`.
    pub fn at_least(backend: &str, check: &str, case: &str, value: f64, limit: f64) -> Self {
        Self {
            better: Better::Higher,
            pass: value >= limit,
            ..Self::at_most(backend, check, case, value, limit)
        }
    }

    /// Adds a note.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }
}

/// A backend that was asked for but not measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    /// The backend.
    pub backend: String,
    /// Why (not compiled in, precision not supported, …).
    pub reason: String,
}

/// Everything one conformance run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// `f32`, `bf16` or `f16`.
    pub dtype: String,
    /// The bounds applied.
    pub tolerances: Tolerances,
    /// Backends measured, in order.
    pub backends: Vec<String>,
    /// Backends asked for but not measured.
    pub skipped: Vec<Skipped>,
    /// Every outcome.
    pub outcomes: Vec<Outcome>,
}

/// The value of a difference that cannot be measured (lengths differ, a sequence diverged):
/// finite, so JSON keeps it, and beyond every bound.
pub const INCOMPARABLE: f64 = f64::MAX;

/// Largest |a - b| over paired entries and its index (NaN counts as worst); `(0, 0.0)` if empty.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> (usize, f64) {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .enumerate()
        .fold((0, 0.0f64), |acc, (i, d)| {
            if d > acc.1 || d.is_nan() && !acc.1.is_nan() {
                (i, d)
            } else {
                acc
            }
        })
}

/// Number of leading entries on which `a` and `b` agree.
pub fn agreeing_prefix<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Scores many prompts at once (they share forward passes); each result without the leading `None`.
pub fn score_all(client: &SamplingClient, prompts: &[Vec<u32>]) -> infermux::Result<Vec<Vec<f64>>> {
    let pending: Vec<_> = prompts
        .iter()
        .map(|p| client.compute_logprobs(ModelInput::from_ints(p.clone())))
        .collect();
    pending
        .into_iter()
        .map(|fut| {
            let got = fut.wait()?;
            Ok(got
                .iter()
                .skip(1)
                .map(|x| x.unwrap_or(f32::NAN) as f64)
                .collect())
        })
        .collect()
}

fn greedy_params(tokens: usize) -> SamplingParams {
    SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(tokens)
    }
}

/// What one backend produced on the golden prompts; kept for the pairwise comparisons.
#[derive(Debug, Clone)]
pub struct BackendRun {
    /// The backend.
    pub backend: BackendKind,
    /// Prompt logprobs (without the first `None`) per golden case.
    pub prompt_logprobs: Vec<Vec<f64>>,
}

/// Runs every single-backend case on `client` and appends the outcomes. For a tiny variant's
/// goldens ([`Goldens::variant`]) every case name carries the variant's prefix.
pub fn run_backend(
    backend: BackendKind,
    client: &SamplingClient,
    goldens: &Goldens,
    tol: &Tolerances,
    out: &mut Vec<Outcome>,
) -> infermux::Result<BackendRun> {
    let name = backend.as_str();
    let prompts: Vec<Vec<u32>> = goldens
        .cases
        .iter()
        .map(|c| c.prompt_tokens.clone())
        .collect();
    let prompt_logprobs = score_all(client, &prompts)?;
    out.extend(reference_logprobs(
        name,
        &goldens.cases,
        &prompt_logprobs,
        tol,
    ));
    out.extend(greedy_agreement(name, client, &goldens.cases, tol)?);
    // Golden case names already carry a tiny variant's prefix; these cases get it here.
    let label = |mut o: Outcome| {
        o.case = goldens.label(&o.case);
        o
    };
    out.extend(sampled_vs_scored(name, client, tol)?.into_iter().map(label));
    out.push(label(seeded_reproducibility(name, client)?));
    out.extend(batch_invariance(name, client, tol)?.into_iter().map(label));
    Ok(BackendRun {
        backend,
        prompt_logprobs,
    })
}

/// Prompt logprobs vs the goldens, one outcome per golden prompt.
pub fn reference_logprobs(
    backend: &str,
    cases: &[GoldenCase],
    scores: &[Vec<f64>],
    tol: &Tolerances,
) -> Vec<Outcome> {
    cases
        .iter()
        .zip(scores)
        .map(|(case, got)| {
            let expected: Vec<f64> = case.prompt_logprobs[1..]
                .iter()
                .map(|x| x.unwrap_or(f64::NAN))
                .collect();
            let (i, worst) = if got.len() == expected.len() {
                max_abs_diff(got, &expected)
            } else {
                (0, INCOMPARABLE)
            };
            Outcome::at_most(
                backend,
                "reference_logprobs",
                &case.name,
                worst,
                tol.reference,
            )
            .with_detail(format!("{} tokens, worst at {}", got.len() + 1, i + 1))
        })
        .collect()
}

/// Greedy continuations of the golden prompts: leading tokens equal to the goldens', and the
/// logprobs of that common prefix against the goldens'.
pub fn greedy_agreement(
    backend: &str,
    client: &SamplingClient,
    cases: &[GoldenCase],
    tol: &Tolerances,
) -> infermux::Result<Vec<Outcome>> {
    let pending: Vec<_> = cases
        .iter()
        .map(|c| {
            client.sample(
                ModelInput::from_ints(c.prompt_tokens.clone()),
                1,
                greedy_params(GREEDY_TOKENS),
                false,
                0,
            )
        })
        .collect();
    let mut out = Vec::new();
    for (case, fut) in cases.iter().zip(pending) {
        let seq = fut.wait()?.sequences.remove(0);
        let agree = agreeing_prefix(&seq.tokens, &case.greedy_tokens);
        out.push(
            Outcome::at_least(
                backend,
                "greedy_agreement",
                &case.name,
                agree as f64,
                tol.greedy_min_agree as f64,
            )
            .with_detail(format!("{agree}/{} tokens", case.greedy_tokens.len())),
        );
        let got: Vec<f64> = seq
            .logprobs
            .unwrap_or_default()
            .iter()
            .map(|&x| x as f64)
            .collect();
        let (i, worst) = max_abs_diff(&got[..agree], &case.greedy_logprobs[..agree]);
        out.push(
            Outcome::at_most(backend, "greedy_logprobs", &case.name, worst, tol.reference)
                .with_detail(format!("over {agree} common tokens, worst at {i}")),
        );
    }
    Ok(out)
}

/// The prompt of the sampling cases.
pub const STORY_PROMPT: &str = "Once upon a time, in a small village,";

/// Seeded samples at T=1: each sampled token's logprob vs scoring prompt + sample.
pub fn sampled_vs_scored(
    backend: &str,
    client: &SamplingClient,
    tol: &Tolerances,
) -> infermux::Result<Vec<Outcome>> {
    let prompt = client.get_tokenizer().encode(STORY_PROMPT, false)?;
    let params = SamplingParams {
        temperature: 1.0,
        seed: Some(1234),
        max_tokens: Some(24),
        ignore_eos: true,
        ..Default::default()
    };
    let response = client
        .sample(ModelInput::from_ints(prompt.clone()), 2, params, false, 0)
        .wait()?;
    let mut out = Vec::new();
    for (k, seq) in response.sequences.into_iter().enumerate() {
        let mut full = prompt.clone();
        full.extend(&seq.tokens);
        let scored = score_all(client, &[full])?.remove(0);
        let scored = &scored[prompt.len() - 1..];
        let sampled: Vec<f64> = seq
            .logprobs
            .unwrap_or_default()
            .iter()
            .map(|&x| x as f64)
            .collect();
        let (i, worst) = if sampled.len() == scored.len() {
            max_abs_diff(&sampled, scored)
        } else {
            (0, INCOMPARABLE)
        };
        out.push(
            Outcome::at_most(
                backend,
                "sample_vs_score",
                &format!("sample{k}"),
                worst,
                tol.sample_vs_score,
            )
            .with_detail(format!("{} tokens, worst at {i}", sampled.len())),
        );
    }
    Ok(out)
}

/// Busy-batch traffic: `n` requests with distinct prompts and seeds, longer than `tokens`.
fn busy_traffic(
    client: &SamplingClient,
    n: usize,
    tokens: usize,
) -> infermux::Result<Vec<infermux::SamplerFuture<SampleResponse>>> {
    let tokenizer = client.get_tokenizer();
    (0..n)
        .map(|i| {
            let text = format!("Request number {i} asks about the number {}", i * 17);
            let p = ModelInput::from_ints(tokenizer.encode(&text, false)?);
            let params = SamplingParams {
                temperature: 1.0,
                seed: Some(i as u64),
                max_tokens: Some(tokens + 8 + i),
                ignore_eos: true,
                ..Default::default()
            };
            Ok(client.sample(p, 1, params, false, 0))
        })
        .collect()
}

/// Four seeded samples at T=0.8, alone and then among busy traffic: how many differ (must be 0).
pub fn seeded_reproducibility(backend: &str, client: &SamplingClient) -> infermux::Result<Outcome> {
    let tokenizer = client.get_tokenizer();
    let prompt = ModelInput::from_ints(tokenizer.encode("My favourite animal is", false)?);
    let params = SamplingParams {
        temperature: 0.8,
        seed: Some(7),
        max_tokens: Some(16),
        ..Default::default()
    };
    let tokens = |r: SampleResponse| {
        r.sequences
            .into_iter()
            .map(|s| s.tokens)
            .collect::<Vec<_>>()
    };
    let alone = tokens(
        client
            .sample(prompt.clone(), 4, params.clone(), false, 0)
            .wait()?,
    );
    let others = busy_traffic(client, BUSY_BATCH - 4, 16)?;
    let busy = tokens(client.sample(prompt, 4, params, false, 0).wait()?);
    for o in others {
        o.wait()?;
    }
    let differing = alone.iter().zip(&busy).filter(|(a, b)| a != b).count();
    let distinct: std::collections::HashSet<_> = alone.iter().collect();
    Ok(Outcome::at_most(
        backend,
        "seeded_reproducibility",
        "alone_vs_busy",
        differing as f64,
        0.0,
    )
    .with_detail(format!(
        "{differing}/4 samples changed under load; {} distinct samples",
        distinct.len()
    )))
}

/// The text of the batch-invariance cases.
pub const INVARIANCE_PROMPT: &str =
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg";

/// One sequence's logprobs at batch 1 vs inside a batch of [`BUSY_BATCH`]: scoring its prompt
/// (`score`), and a 32-token greedy continuation decoded alongside others (`decode`).
pub fn batch_invariance(
    backend: &str,
    client: &SamplingClient,
    tol: &Tolerances,
) -> infermux::Result<Vec<Outcome>> {
    let tokenizer = client.get_tokenizer();
    let prompt = tokenizer.encode(INVARIANCE_PROMPT, false)?;
    let mut out = Vec::new();

    // Scoring: alone, then last of BUSY_BATCH prompts of mixed lengths submitted together.
    let alone = score_all(client, std::slice::from_ref(&prompt))?.remove(0);
    let mut batch: Vec<Vec<u32>> = (0..BUSY_BATCH - 1)
        .map(|i| {
            let text = format!(
                "Filler prompt {i}: {}",
                "lorem ipsum dolor ".repeat(1 + i % 4)
            );
            tokenizer.encode(&text, false)
        })
        .collect::<infermux::Result<_>>()?;
    batch.push(prompt.clone());
    let busy = score_all(client, &batch)?.pop().unwrap_or_default();
    let (i, worst) = max_abs_diff(&alone, &busy);
    out.push(
        Outcome::at_most(
            backend,
            "batch_invariance",
            "score",
            worst,
            tol.batch_invariance,
        )
        .with_detail(format!(
            "{} tokens, batch 1 vs {BUSY_BATCH}, worst at {}",
            prompt.len(),
            i + 1
        )),
    );

    // Decoding: a greedy continuation alone, then among BUSY_BATCH - 1 longer requests.
    let input = ModelInput::from_ints(prompt);
    let alone = client
        .sample(input.clone(), 1, greedy_params(GREEDY_TOKENS), false, 0)
        .wait()?
        .sequences
        .remove(0);
    let others = busy_traffic(client, BUSY_BATCH - 1, GREEDY_TOKENS)?;
    let busy = client
        .sample(input, 1, greedy_params(GREEDY_TOKENS), false, 0)
        .wait()?
        .sequences
        .remove(0);
    for o in others {
        o.wait()?;
    }
    let common = agreeing_prefix(&alone.tokens, &busy.tokens);
    let lp = |s: &infermux::SampledSequence| -> Vec<f64> {
        s.logprobs
            .as_deref()
            .unwrap_or_default()
            .iter()
            .take(common)
            .map(|&x| x as f64)
            .collect()
    };
    let (i, mut worst) = max_abs_diff(&lp(&alone), &lp(&busy));
    if common < alone.tokens.len().max(busy.tokens.len()) {
        // The continuations diverged: never let that pass, however close the common prefix.
        worst = INCOMPARABLE;
    }
    out.push(
        Outcome::at_most(
            backend,
            "batch_invariance",
            "decode",
            worst,
            tol.batch_invariance,
        )
        .with_detail(format!(
            "{common}/{} greedy tokens equal, batch 1 vs {BUSY_BATCH}, worst at {i}",
            alone.tokens.len()
        )),
    );
    Ok(out)
}

/// Max |Δ| of the golden prompts' logprobs between every pair of backends, per prompt.
pub fn pairwise(runs: &[BackendRun], cases: &[GoldenCase], tol: &Tolerances) -> Vec<Outcome> {
    let mut out = Vec::new();
    for (i, a) in runs.iter().enumerate() {
        for b in &runs[i + 1..] {
            let pair = format!("{}~{}", a.backend, b.backend);
            for ((case, x), y) in cases.iter().zip(&a.prompt_logprobs).zip(&b.prompt_logprobs) {
                let (j, worst) = if x.len() == y.len() {
                    max_abs_diff(x, y)
                } else {
                    (0, INCOMPARABLE)
                };
                out.push(
                    Outcome::at_most(&pair, "pairwise_logprobs", &case.name, worst, tol.pairwise)
                        .with_detail(format!("worst at {}", j + 1)),
                );
            }
        }
    }
    out
}

impl Report {
    /// Whether every outcome is within its bound.
    pub fn passed(&self) -> bool {
        self.outcomes.iter().all(|o| o.pass)
    }

    /// The failing outcomes.
    pub fn failures(&self) -> impl Iterator<Item = &Outcome> {
        self.outcomes.iter().filter(|o| !o.pass)
    }

    /// A Markdown table: one row per backend (or pair), one column per check, each cell the
    /// worst value over its cases (and ✗ where any case fails).
    pub fn table(&self) -> String {
        const COLUMNS: [(&str, &str); 7] = [
            ("reference_logprobs", "max |Δ| vs HF"),
            ("greedy_agreement", "greedy agree"),
            ("greedy_logprobs", "greedy |Δ| vs HF"),
            ("sample_vs_score", "sampled vs scored"),
            ("seeded_reproducibility", "seeded alone≡busy"),
            ("batch_invariance", "batch 1 vs 16"),
            ("pairwise_logprobs", "pairwise max |Δ|"),
        ];
        // row -> check -> (worst value, all pass, better)
        // Rows in run order, single backends before pairs.
        let mut order: Vec<&str> = Vec::new();
        for o in &self.outcomes {
            if !order.contains(&o.backend.as_str()) {
                order.push(&o.backend);
            }
        }
        order.sort_by_key(|b| b.contains('~'));
        let mut rows: BTreeMap<usize, BTreeMap<&str, (f64, bool, usize)>> = BTreeMap::new();
        for o in &self.outcomes {
            let row = order.iter().position(|b| *b == o.backend).unwrap_or(0);
            let cell = rows
                .entry(row)
                .or_default()
                .entry(
                    COLUMNS
                        .iter()
                        .find(|c| c.0 == o.check)
                        .map(|c| c.0)
                        .unwrap_or("other"),
                )
                .or_insert((
                    match o.better {
                        Better::Lower => 0.0,
                        Better::Higher => f64::INFINITY,
                    },
                    true,
                    0,
                ));
            cell.0 = match o.better {
                Better::Lower if o.value > cell.0 || o.value.is_nan() => o.value,
                Better::Higher if o.value < cell.0 => o.value,
                _ => cell.0,
            };
            cell.1 &= o.pass;
            cell.2 += 1;
        }
        let mut s = format!(
            "conformance on {} {} (tolerances: {}; reference {:e}, pairwise {:e}, sampled vs scored {:e}, batch {:e}, greedy ≥ {}/{GREEDY_TOKENS})\n\n",
            self.device,
            self.dtype,
            self.tolerances.name,
            self.tolerances.reference,
            self.tolerances.pairwise,
            self.tolerances.sample_vs_score,
            self.tolerances.batch_invariance,
            self.tolerances.greedy_min_agree,
        );
        s.push_str("| backend |");
        for (_, title) in COLUMNS {
            s.push_str(&format!(" {title} |"));
        }
        s.push_str("\n|---|");
        s.push_str(&"---|".repeat(COLUMNS.len()));
        s.push('\n');
        for (row, cells) in &rows {
            s.push_str(&format!("| {} |", order[*row]));
            for (check, _) in COLUMNS {
                let text = match cells.get(check) {
                    None => "".to_string(),
                    Some(&(v, pass, n)) => {
                        let mark = if pass { "" } else { " ✗" };
                        match check {
                            "greedy_agreement" => {
                                format!("min {v}/{GREEDY_TOKENS} ({n} prompts){mark}")
                            }
                            "seeded_reproducibility" => {
                                if v == 0.0 {
                                    format!("yes{mark}")
                                } else {
                                    format!("{v} changed{mark}")
                                }
                            }
                            _ => format!("{v:.2e}{mark}"),
                        }
                    }
                };
                s.push_str(&format!(" {text} |"));
            }
            s.push('\n');
        }
        for skipped in &self.skipped {
            s.push_str(&format!(
                "\n{}: skipped ({})",
                skipped.backend, skipped.reason
            ));
        }
        let failures: Vec<_> = self.failures().collect();
        if failures.is_empty() {
            s.push_str("\nall checks within tolerance\n");
        } else {
            s.push_str(&format!("\n{} violation(s):\n", failures.len()));
            for o in failures {
                s.push_str(&format!(
                    "  {}: {} (limit {}{}) {}\n",
                    o.key(),
                    o.value,
                    match o.better {
                        Better::Lower => "≤ ",
                        Better::Higher => "≥ ",
                    },
                    o.limit,
                    o.detail
                ));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_abs_diff_finds_the_worst_and_nan() {
        assert_eq!(max_abs_diff(&[1.0, 2.0, 3.0], &[1.0, 2.5, 3.1]), (1, 0.5));
        assert!(max_abs_diff(&[1.0, f64::NAN], &[1.0, 1.0]).1.is_nan());
        assert_eq!(max_abs_diff(&[], &[]), (0, 0.0));
        assert_eq!(agreeing_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
    }

    #[test]
    fn outcomes_pass_by_direction_and_tabulate() {
        let a = Outcome::at_most("candle", "reference_logprobs", "x", 2e-4, 1e-3);
        let b = Outcome::at_least("candle", "greedy_agreement", "x", 30.0, 32.0);
        let c = Outcome::at_most("candle~torch", "pairwise_logprobs", "x", f64::NAN, 1e-3);
        assert!(a.pass && !b.pass && !c.pass);
        assert_eq!(a.key(), "candle/reference_logprobs/x");
        let report = Report {
            device: "cpu".into(),
            dtype: "f32".into(),
            tolerances: Tolerances::F32,
            backends: vec!["candle".into()],
            skipped: vec![],
            outcomes: vec![a, b, c],
        };
        assert!(!report.passed());
        let table = report.table();
        assert!(table.contains("| candle | 2.00e-4 |"), "{table}");
        assert!(table.contains("min 30/32 (1 prompts) ✗"), "{table}");
        assert!(table.contains("2 violation(s)"), "{table}");
        let json = serde_json::to_string(&report).unwrap();
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back["outcomes"][0]["better"], "lower");
    }
}
