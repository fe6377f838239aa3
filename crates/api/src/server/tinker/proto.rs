//! The protobuf encoding of Tinker's `SampleResponse` (`tinker_public.proto`, field numbers from
//! the SDK's descriptor), by hand: the SDK decodes `retrieve_future`'s sample result only as
//! `application/x-protobuf`, and these few messages do not warrant a code generator.
//!
//! ```text
//! SampleResponse  { 1 repeated SampledSequence sequences; 2 bytes prompt_logprobs (f32 LE, NaN =
//!                   none); 3 TopkLogprobs topk_prompt_logprobs; 4 int32 prompt_cache_hit_tokens }
//! SampledSequence { 1 StopReason stop_reason (STOP 0, LENGTH 1); 2 bytes tokens (i32 LE);
//!                   3 bytes logprobs (f32 LE); 4 TopkLogprobs topk_sampled_logprobs }
//! TopkLogprobs    { 1 bytes token_ids (i32 LE, N×K); 2 bytes logprobs (f32 LE); 3 uint32 k;
//!                   4 uint32 length (N) }   an empty cell is (0, -99999.0)
//! ```

use infermux_core::{TokenId, TopLogprobs};

use crate::{SampleResponse, StopReason};

/// Tinker's filler for a top-k cell with no entry (a `None` row or a short one).
const MASK_LOGPROB: f32 = -99999.0;

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    varint(out, u64::from(field) << 3 | 2);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// A varint field (wire type 0); proto3 leaves zero values out.
fn uint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        varint(out, u64::from(field) << 3);
        varint(out, v);
    }
}

fn ids_le(ids: impl IntoIterator<Item = TokenId>) -> Vec<u8> {
    ids.into_iter()
        .flat_map(|t| (t as i32).to_le_bytes())
        .collect()
}

fn f32_le(xs: impl IntoIterator<Item = f32>) -> Vec<u8> {
    xs.into_iter().flat_map(f32::to_le_bytes).collect()
}

/// A dense `rows × k` `TopkLogprobs`, `None` rows and missing cells masked.
fn topk(rows: &[Option<TopLogprobs>], k: usize) -> Vec<u8> {
    let cell = |row: &Option<TopLogprobs>, j: usize| {
        row.as_ref()
            .and_then(|r| r.get(j).copied())
            .unwrap_or((0, MASK_LOGPROB))
    };
    let cells = || {
        rows.iter()
            .flat_map(move |r| (0..k).map(move |j| cell(r, j)))
    };
    let mut out = Vec::new();
    bytes_field(&mut out, 1, &ids_le(cells().map(|c| c.0)));
    bytes_field(&mut out, 2, &f32_le(cells().map(|c| c.1)));
    uint_field(&mut out, 3, k as u64);
    uint_field(&mut out, 4, rows.len() as u64);
    out
}

/// `r` as a `SampleResponse` message. `topk_prompt` and `topk_sampled` are the `k` the request
/// asked for (the widths of the dense matrices; 0: none asked).
pub(super) fn sample_response(
    r: &SampleResponse,
    topk_prompt: usize,
    topk_sampled: usize,
) -> Vec<u8> {
    let mut out = Vec::new();
    for s in &r.sequences {
        let mut seq = Vec::new();
        let stop = match s.stop_reason {
            StopReason::Stop => 0,
            StopReason::Length => 1,
        };
        uint_field(&mut seq, 1, stop);
        bytes_field(&mut seq, 2, &ids_le(s.tokens.iter().copied()));
        if let Some(lps) = &s.logprobs {
            bytes_field(&mut seq, 3, &f32_le(lps.iter().copied()));
        }
        if topk_sampled > 0
            && let Some(rows) = &s.top_logprobs
        {
            let rows: Vec<Option<TopLogprobs>> = rows.iter().cloned().map(Some).collect();
            bytes_field(&mut seq, 4, &topk(&rows, topk_sampled));
        }
        bytes_field(&mut out, 1, &seq);
    }
    if let Some(lps) = &r.prompt_logprobs {
        bytes_field(
            &mut out,
            2,
            &f32_le(lps.iter().map(|l| l.unwrap_or(f32::NAN))),
        );
    }
    if topk_prompt > 0
        && let Some(rows) = &r.topk_prompt_logprobs
    {
        bytes_field(&mut out, 3, &topk(rows, topk_prompt));
    }
    if r.prompt_cache_hit_tokens > 0 {
        uint_field(&mut out, 4, r.prompt_cache_hit_tokens as u64);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SampledSequence;
    use infermux_core::FinishReason;

    fn seq(tokens: Vec<TokenId>, logprobs: Vec<f32>, stop_reason: StopReason) -> SampledSequence {
        SampledSequence {
            tokens,
            logprobs: Some(logprobs),
            stop_reason,
            finish_reason: match stop_reason {
                StopReason::Stop => FinishReason::Eos,
                StopReason::Length => FinishReason::Length,
            },
            stopped_by: None,
            text: None,
            processed_logprobs: None,
            top_logprobs: None,
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The bytes the research mock served and the official SDK decoded (its `compute_logprobs`
    /// reply: one 1-token sequence, five prompt logprobs with NaN first).
    #[test]
    fn compute_logprobs_reply_matches_the_bytes_the_sdk_decoded() {
        let r = SampleResponse {
            sequences: vec![seq(vec![516], vec![-0.6], StopReason::Length)],
            prompt_logprobs: Some(vec![
                None,
                Some(-1.01),
                Some(-1.02),
                Some(-1.03),
                Some(-1.04),
            ]),
            topk_prompt_logprobs: None,
            ..SampleResponse::default()
        };
        let want = hex("0a0e 0801 1204 04020000 1a04 9a9919bf
                        1214 0000c07f ae4781bf 5c8f82bf 0ad783bf b81e85bf");
        assert_eq!(sample_response(&r, 0, 0), want);
    }

    /// A `stop` sequence leaves field 1 out (proto3 zero); top-k rows are dense with row 0 and
    /// short rows masked.
    #[test]
    fn stop_reason_and_topk_rows_encode_densely() {
        let r = SampleResponse {
            sequences: vec![seq(vec![839, 852], vec![-0.7, -0.6], StopReason::Stop)],
            prompt_logprobs: None,
            topk_prompt_logprobs: Some(vec![None, Some(vec![(102, -0.5)])]),
            ..SampleResponse::default()
        };
        let got = sample_response(&r, 2, 0);
        let mut want = hex("0a14 1208 47030000 54030000 1a08 333333bf 9a9919bf");
        let mut top = Vec::new();
        bytes_field(&mut top, 1, &ids_le([0, 0, 102, 0]));
        bytes_field(
            &mut top,
            2,
            &f32_le([MASK_LOGPROB, MASK_LOGPROB, -0.5, MASK_LOGPROB]),
        );
        top.extend_from_slice(&hex("1802 2002"));
        bytes_field(&mut want, 3, &top);
        assert_eq!(got, want);
        assert_eq!(&top[..2], &hex("0a10")[..], "16 bytes of ids");
    }
}
