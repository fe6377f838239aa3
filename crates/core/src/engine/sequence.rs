//! One continuation being decoded: its tokens, text, stop checks and stream cursor.

use crate::TokenId;
use crate::backend::{ModelInfo, SlotId};
use crate::engine::job::Job;
use crate::engine::request::{
    FinishReason, GeneratedSequence, SequenceUpdate, StopReason, TopLogprobs,
};
use crate::error::EngineError;
use crate::guided::{TokenConstraint, TokenMask};
use crate::params::{LogprobsMode, OutputKind};
use crate::sampling::SampledToken;
use crate::text::{DecodeOptions, IncrementalDetokenizer, TextCodec};

/// What a sequence consults to decide whether it stops.
pub(crate) struct SeqCtx<'a> {
    pub job: &'a Job,
    pub info: &'a ModelInfo,
    pub codec: Option<&'a dyn TextCodec>,
}

pub(crate) struct Seq {
    pub slot: SlotId,
    pub out: GeneratedSequence,
    pub done: bool,
    detok: Option<IncrementalDetokenizer>,
    /// Bytes of text already checked for stop strings.
    stop_checked: usize,
    /// Text bytes that are final (a stop string cut the text here).
    text_limit: Option<usize>,
    pub constraint: Option<Box<dyn TokenConstraint>>,
    /// Allowed tokens for the next sample, when constrained.
    pub mask: Option<TokenMask>,
    sent_tokens: usize,
    sent_text: usize,
    finish_sent: bool,
}

impl Seq {
    pub fn new(index: usize, slot: SlotId, ctx: &SeqCtx<'_>) -> Self {
        let params = &ctx.job.params;
        let mut out = GeneratedSequence::empty(index);
        out.processed_logprobs =
            (params.logprobs_mode == LogprobsMode::RawAndProcessed).then(Vec::new);
        out.top_logprobs = params.logprobs.map(|_| Vec::new());
        let detok = ctx.codec.filter(|_| params.needs_text()).map(|codec| {
            let options = DecodeOptions {
                skip_special_tokens: params.skip_special_tokens,
                spaces_between_special_tokens: params.spaces_between_special_tokens,
            };
            IncrementalDetokenizer::new(codec, &ctx.job.prompt, options)
        });
        Self {
            slot,
            out,
            done: false,
            detok,
            stop_checked: 0,
            text_limit: None,
            constraint: None,
            mask: None,
            sent_tokens: 0,
            sent_text: 0,
            finish_sent: false,
        }
    }

    /// A sequence that is already complete (a finished beam).
    pub fn finished(slot: SlotId, out: GeneratedSequence) -> Self {
        Self {
            slot,
            out,
            done: true,
            detok: None,
            stop_checked: 0,
            text_limit: None,
            constraint: None,
            mask: None,
            sent_tokens: 0,
            sent_text: 0,
            finish_sent: false,
        }
    }

    /// The last generated token (the next decode step's input).
    pub fn last_token(&self) -> TokenId {
        *self
            .out
            .tokens
            .last()
            .expect("a decoding sequence has a token")
    }

    /// Records a sampled token and checks every stop condition.
    pub fn accept(
        &mut self,
        sampled: SampledToken,
        top: Option<TopLogprobs>,
        ctx: &SeqCtx<'_>,
    ) -> Result<(), EngineError> {
        let (job, params) = (ctx.job, &ctx.job.params);
        let token = sampled.token;
        let out = &mut self.out;
        out.tokens.push(token);
        out.logprobs.push(sampled.logprob);
        out.cumulative_logprob += sampled.logprob as f64;
        if let Some(p) = &mut out.processed_logprobs {
            p.push(sampled.processed_logprob);
        }
        if let (Some(all), Some(top)) = (&mut out.top_logprobs, top) {
            all.push(top);
        }
        if let Some(c) = &mut self.constraint {
            c.commit(token)?;
        }
        let generated = out.tokens.len();
        let token_stop = if !params.ignore_eos && ctx.info.eos_token_ids.contains(&token) {
            Some(FinishReason::Eos)
        } else if params.stop_token_ids.contains(&token) {
            Some(FinishReason::StopToken)
        } else {
            None
        };
        let mut finish = token_stop.map(|r| (r, Some(StopReason::Token(token))));
        if let (Some(detok), Some(codec)) = (&mut self.detok, ctx.codec) {
            if token_stop.is_none() || params.include_stop_str_in_output {
                detok.push(codec, token)?;
            }
            if finish.is_none()
                && generated >= params.min_tokens
                && let Some(stop) = &job.stop
                && let Some(hit) = stop.find(detok.text(), self.stop_checked)
            {
                self.text_limit = Some(hit.keep);
                finish = Some((
                    FinishReason::StopString,
                    Some(StopReason::String(hit.matched)),
                ));
            }
            self.stop_checked = detok.text().len();
        }
        if finish.is_none() && generated >= job.max_new_tokens {
            finish = Some((FinishReason::Length, None));
        }
        if let Some((reason, stop_reason)) = finish {
            self.finish(reason, stop_reason, ctx.codec)?;
        }
        Ok(())
    }

    /// Ends the sequence: flushes held-back text and fixes the final text.
    pub fn finish(
        &mut self,
        reason: FinishReason,
        stop_reason: Option<StopReason>,
        codec: Option<&dyn TextCodec>,
    ) -> Result<(), EngineError> {
        self.out.finish_reason = reason;
        self.out.stop_reason = stop_reason;
        self.done = true;
        self.mask = None;
        if let (Some(detok), Some(codec)) = (&mut self.detok, codec) {
            if self.text_limit.is_none() {
                detok.flush(codec)?;
            }
            let end = self.text_limit.unwrap_or(detok.text().len());
            self.text_limit = Some(end);
            self.out.text = Some(detok.text()[..end].to_string());
        }
        Ok(())
    }

    /// Text bytes that may be shown now: all of it once final, else minus a possible stop tail.
    fn visible_text(&self, job: &Job) -> &str {
        let Some(detok) = &self.detok else {
            return "";
        };
        let text = detok.text();
        let end = match self.text_limit {
            Some(end) => end,
            None => text
                .len()
                .saturating_sub(job.stop.as_ref().map_or(0, |s| s.holdback(text))),
        };
        &text[..end]
    }

    /// The update to stream now, if anything is new; advances the stream cursor.
    pub fn update(&mut self, job: &Job) -> Option<SequenceUpdate> {
        let kind = job.params.output_kind;
        let text_len = self.visible_text(job).len();
        let news = self.out.tokens.len() > self.sent_tokens || text_len > self.sent_text;
        let finishing = self.done && !self.finish_sent;
        if !news && !finishing {
            return None;
        }
        let (t0, b0) = match kind {
            OutputKind::Delta => (self.sent_tokens, self.sent_text),
            OutputKind::Cumulative | OutputKind::FinalOnly => (0, 0),
        };
        let out = &self.out;
        let update = SequenceUpdate {
            index: out.index,
            tokens: out.tokens[t0..].to_vec(),
            logprobs: out.logprobs[t0..].to_vec(),
            processed_logprobs: out.processed_logprobs.as_ref().map(|p| p[t0..].to_vec()),
            top_logprobs: out.top_logprobs.as_ref().map(|p| p[t0..].to_vec()),
            // A stop pattern can match text that was already streamed (only stop strings are
            // held back): the final text is then shorter than what was sent, and a delta
            // has nothing new to add.
            text: self
                .visible_text(job)
                .get(b0..)
                .unwrap_or_default()
                .to_string(),
            finish_reason: self.done.then_some(out.finish_reason),
            stop_reason: if self.done {
                out.stop_reason.clone()
            } else {
                None
            },
        };
        self.sent_tokens = self.out.tokens.len();
        self.sent_text = text_len;
        self.finish_sent = self.done;
        Some(update)
    }
}
