//! [`LlgDecoder`]: the per-model llguidance state (token trie, parser factory, grammar cache)
//! behind core's [`GuidedDecoder`].

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use infermux_core::{GuidedDecoder, GuidedDecodingParams, GuidedError, TokenConstraint, TokenId};
use llguidance::api::ParserLimits;
use llguidance::{Matcher, ParserFactory};
use tokenizers::Tokenizer;

use crate::constraint::LlgConstraint;
use crate::grammar::build_grammar;

/// Bounds on what one request may cost to compile and to step, so that a pathological schema,
/// regex or grammar is rejected with [`GuidedError::Invalid`] instead of hanging the engine.
///
/// The fuel limits are llguidance's [`ParserLimits`]; their doc comments give rough speeds
/// (lexer fuel ≈ 50k/ms at compile time, 14k/ms per mask), so the defaults cap compilation
/// at tens of milliseconds and one mask at about 15 ms.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsConfig {
    /// Longest schema / regex / grammar text (summed over choice options), in bytes.
    pub max_input_bytes: usize,
    /// Most symbols in the compiled grammar's productions (`ParserLimits::max_grammar_size`).
    pub max_grammar_size: usize,
    /// Lexer fuel for building the initial regex ASTs (`ParserLimits::initial_lexer_fuel`).
    pub initial_lexer_fuel: u64,
    /// Lexer fuel for one token mask (`ParserLimits::step_lexer_fuel`).
    pub step_lexer_fuel: u64,
    /// Earley items created for one token mask (`ParserLimits::step_max_items`).
    pub step_max_items: usize,
    /// Earley items in one row: the grammar's branching factor (`ParserLimits::max_items_in_row`).
    pub max_items_in_row: usize,
    /// Lexer DFA states, roughly 1–2 kB each (`ParserLimits::max_lexer_states`).
    pub max_lexer_states: usize,
    /// Wall-clock budget for compiling a constraint and computing its first mask (where the
    /// lexer builds its initial states, the step that blows up on pathological regexes such as
    /// nested counted repetitions); past it the work is cancelled and the request rejected.
    pub max_compile_time: Duration,
    /// Compiled grammars kept for reuse by identical requests (0 disables the cache).
    pub grammar_cache_entries: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let llg = ParserLimits::default();
        Self {
            max_input_bytes: 1 << 20,
            max_grammar_size: llg.max_grammar_size,
            initial_lexer_fuel: llg.initial_lexer_fuel,
            step_lexer_fuel: llg.step_lexer_fuel,
            step_max_items: llg.step_max_items,
            max_items_in_row: llg.max_items_in_row,
            max_lexer_states: llg.max_lexer_states,
            max_compile_time: Duration::from_secs(2),
            grammar_cache_entries: 64,
        }
    }
}

impl LimitsConfig {
    fn parser_limits(&self) -> ParserLimits {
        ParserLimits {
            max_items_in_row: self.max_items_in_row,
            initial_lexer_fuel: self.initial_lexer_fuel,
            step_lexer_fuel: self.step_lexer_fuel,
            step_max_items: self.step_max_items,
            max_lexer_states: self.max_lexer_states,
            max_grammar_size: self.max_grammar_size,
            // Errors are request errors: keep them short, without the grammar and the tokens.
            verbose_errors: false,
            ..ParserLimits::default()
        }
    }
}

/// Why an [`LlgDecoder`] could not be built for a tokenizer and model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LlgBuildError {
    /// The tokenizer could not be loaded or turned into llguidance's byte-level token trie.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// No EOS id was given.
    #[error("at least one EOS token id is needed")]
    NoEos,
    /// An EOS id is not a token of the tokenizer.
    #[error("EOS id {eos} is outside the tokenizer's {tokenizer_vocab} ids")]
    EosOutOfRange {
        /// The offending id.
        eos: TokenId,
        /// Ids the tokenizer knows.
        tokenizer_vocab: usize,
    },
    /// The model's logits are narrower than the tokenizer's vocabulary.
    #[error("model vocab size {model} is smaller than the tokenizer's {tokenizer}")]
    VocabTooSmall {
        /// The model's vocab size.
        model: usize,
        /// The tokenizer's vocab size.
        tokenizer: usize,
    },
    /// llguidance failed to build its parser factory.
    #[error("llguidance: {0}")]
    Llguidance(String),
}

/// Compiled grammars by their serialized form, evicted oldest first.
#[derive(Default)]
struct GrammarCache {
    map: HashMap<String, Matcher>,
    order: VecDeque<String>,
}

/// Guided decoding for one model through llguidance.
///
/// Building it computes the tokenizer's byte-level token trie and llguidance's parser factory
/// (the expensive, per-tokenizer part, some hundreds of milliseconds); every request then only
/// compiles its grammar, and identical requests reuse a cached compiled grammar. Share one
/// decoder (it is `Send + Sync`) across all requests for the model.
pub struct LlgDecoder {
    factory: Arc<ParserFactory>,
    eos: Arc<[TokenId]>,
    vocab_size: usize,
    limits: LimitsConfig,
    cache: Mutex<GrammarCache>,
}

impl std::fmt::Debug for LlgDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlgDecoder")
            .field("eos", &self.eos)
            .field("vocab_size", &self.vocab_size)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl LlgDecoder {
    /// A decoder for a model with `vocab_size` logits whose tokenizer is `tokenizer` and whose
    /// generation ends at any of `eos_ids`. Logit ids past the tokenizer's vocabulary are never
    /// allowed.
    pub fn new(
        tokenizer: Tokenizer,
        eos_ids: &[TokenId],
        vocab_size: usize,
        limits: LimitsConfig,
    ) -> Result<Self, LlgBuildError> {
        let tokenizer_vocab = tokenizer.get_vocab_size(true);
        if eos_ids.is_empty() {
            return Err(LlgBuildError::NoEos);
        }
        if let Some(&eos) = eos_ids.iter().find(|&&id| id as usize >= tokenizer_vocab) {
            return Err(LlgBuildError::EosOutOfRange {
                eos,
                tokenizer_vocab,
            });
        }
        if vocab_size < tokenizer_vocab {
            return Err(LlgBuildError::VocabTooSmall {
                model: vocab_size,
                tokenizer: tokenizer_vocab,
            });
        }
        let tok_env = crate::bridge::tok_env(tokenizer, eos_ids, vocab_size)?;
        let mut factory = ParserFactory::new_simple(&tok_env)
            .map_err(|e| LlgBuildError::Llguidance(e.to_string()))?;
        // A library prints nothing: warnings and errors reach the caller through results.
        factory.quiet();
        *factory.limits_mut() = limits.parser_limits();
        Ok(Self {
            factory: Arc::new(factory),
            eos: eos_ids.into(),
            vocab_size,
            limits,
            cache: Mutex::new(GrammarCache::default()),
        })
    }

    /// Like [`LlgDecoder::new`], reading the tokenizer from a `tokenizer.json` file.
    pub fn from_file(
        tokenizer_json: impl AsRef<Path>,
        eos_ids: &[TokenId],
        vocab_size: usize,
        limits: LimitsConfig,
    ) -> Result<Self, LlgBuildError> {
        let path = tokenizer_json.as_ref();
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| LlgBuildError::Tokenizer(format!("{}: {e}", path.display())))?;
        Self::new(tokenizer, eos_ids, vocab_size, limits)
    }

    /// The model's vocab size (the width of the masks this decoder fills).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The EOS ids allowed once the output is complete.
    pub fn eos_ids(&self) -> &[TokenId] {
        &self.eos
    }

    /// The limits every compilation runs under.
    pub fn limits(&self) -> &LimitsConfig {
        &self.limits
    }

    /// Compiles `params` into a fresh constraint (the typed form of [`GuidedDecoder::compile`]).
    pub fn constraint(&self, params: &GuidedDecodingParams) -> Result<LlgConstraint, GuidedError> {
        let mode = params.mode().map_err(|e| {
            GuidedError::Runtime(format!("invalid guided_decoding parameters: {e}"))
        })?;
        let invalid = |reason: String| GuidedError::Invalid { mode, reason };
        params.validate().map_err(|e| invalid(e.to_string()))?;
        let input_bytes = input_bytes(params);
        if input_bytes > self.limits.max_input_bytes {
            return Err(invalid(format!(
                "the constraint is {input_bytes} bytes, more than the limit of {}",
                self.limits.max_input_bytes
            )));
        }
        // A choice list wider than an Earley row may hold fails only once decoding reaches the
        // row where all options are alive (after a first token many share): whether a request
        // is refused would depend on what it samples. Refused here, whatever it would draw.
        if let Some(n) = params.choice.as_ref().map(Vec::len)
            && n > self.limits.max_items_in_row
        {
            return Err(invalid(format!(
                "{n} choices, more than the grammar engine's limit of {} options",
                self.limits.max_items_in_row
            )));
        }
        let grammar = build_grammar(params, mode)?;
        let key = serde_json::to_string(&grammar).map_err(|e| invalid(e.to_string()))?;
        let matcher = match self.cached(&key) {
            Some(matcher) => matcher,
            None => {
                let parser = self
                    .factory
                    .create_parser(grammar)
                    .map_err(|e| invalid(e.to_string()))?;
                let matcher = self.warm_up(Matcher::new(Ok(parser))).map_err(invalid)?;
                self.store(key, &matcher);
                matcher
            }
        };
        Ok(LlgConstraint::new(
            matcher,
            mode,
            self.eos.clone(),
            self.factory.tok_env().tok_trie().vocab_size(),
        ))
    }

    /// Computes the first mask of a fresh matcher under the `max_compile_time` watchdog, so
    /// that a grammar whose lexer blows up is rejected here rather than stalling the engine.
    fn warm_up(&self, matcher: Matcher) -> Result<Matcher, String> {
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        let mut matcher = matcher.into_cancellable();
        let handle = matcher
            .cancellation_handle()
            .ok_or("llguidance gave no cancellation handle")?;
        let limit = self.limits.max_compile_time;
        let (done, finished) = mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if finished.recv_timeout(limit) == Err(mpsc::RecvTimeoutError::Timeout) {
                handle.cancel();
            }
        });
        let first = matcher
            .compute_mask()
            .map_err(|e| e.to_string())
            .and_then(|_| probe_forced(&matcher));
        let _ = done.send(());
        let _ = watchdog.join();
        match first {
            Ok(()) if !matcher.is_cancelled() => Ok(matcher),
            Ok(_) => Err(format!("compiling took longer than the limit of {limit:?}")),
            Err(_) if matcher.is_cancelled() => {
                Err(format!("compiling took longer than the limit of {limit:?}"))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// A copy of a cached compiled grammar. The copy shares only the lexer's lazily built
    /// (mutex-guarded) state cache with the original, so warm lexer states carry over.
    fn cached(&self, key: &str) -> Option<Matcher> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.map.get(key).cloned()
    }

    fn store(&self, key: String, matcher: &Matcher) {
        let capacity = self.limits.grammar_cache_entries;
        if capacity == 0 {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.map.contains_key(&key) {
            return;
        }
        while cache.order.len() >= capacity {
            if let Some(old) = cache.order.pop_front() {
                cache.map.remove(&old);
            }
        }
        cache.order.push_back(key.clone());
        cache.map.insert(key, matcher.clone());
    }
}

/// Most forced tokens [`probe_forced`] walks.
const PROBE_TOKENS: usize = 16;

/// Walks the tokens the grammar forces at the start (on a copy) and computes the mask after
/// them: grammars that blow up on their first forced step (a 20,000-option choice whose options
/// share a prefix, a regex like `a{1000000000}`) fail here, at compile, rather than after the
/// reply has started.
fn probe_forced(matcher: &Matcher) -> Result<(), String> {
    let mut probe = matcher.deep_clone();
    let forced = probe.compute_ff_tokens();
    if let Some(e) = probe.get_error() {
        return Err(e);
    }
    if forced.is_empty() {
        return Ok(());
    }
    let forced = &forced[..forced.len().min(PROBE_TOKENS)];
    probe
        .try_consume_tokens(forced)
        .map_err(|e| e.to_string())?;
    if !probe.is_stopped() {
        probe.compute_mask().map_err(|e| e.to_string())?;
    }
    probe.get_error().map_or(Ok(()), Err)
}

/// The size of the request's constraint text.
fn input_bytes(params: &GuidedDecodingParams) -> usize {
    let json = params.json.as_ref().map_or(0, |v| match v {
        serde_json::Value::String(s) => s.len(),
        other => other.to_string().len(),
    });
    json + params.regex.as_ref().map_or(0, String::len)
        + params.grammar.as_ref().map_or(0, String::len)
        + params.whitespace_pattern.as_ref().map_or(0, String::len)
        + params
            .choice
            .as_ref()
            .map_or(0, |c| c.iter().map(|s| s.len() + 1).sum())
}

impl GuidedDecoder for LlgDecoder {
    /// Compiles `params`; `vocab_size` is the width of the masks the engine will pass (it
    /// normally equals [`LlgDecoder::vocab_size`]; ids past either width are never allowed).
    fn compile(
        &self,
        params: &GuidedDecodingParams,
        _vocab_size: usize,
    ) -> Result<Box<dyn TokenConstraint>, GuidedError> {
        Ok(Box::new(self.constraint(params)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder() -> LlgDecoder {
        let tokenizer = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/SmolLM2-135M-Instruct/tokenizer.json");
        LlgDecoder::from_file(tokenizer, &[2], 49152, LimitsConfig::default()).unwrap()
    }

    #[test]
    fn grammars_that_blow_up_on_their_forced_start_fail_at_compile() {
        let d = decoder();
        let options: Vec<String> = (0..20_000).map(|i| format!("option-{i}")).collect();
        for params in [
            GuidedDecodingParams::regex("a{1000000000}"),
            GuidedDecodingParams::choice(options),
        ] {
            match d.constraint(&params) {
                Err(GuidedError::Invalid { reason, .. }) => {
                    assert!(!reason.is_empty());
                }
                other => panic!("{params:?}: {other:?}"),
            }
        }
        // A forced start that is fine still compiles (and is cached).
        let ok = GuidedDecodingParams::choice(["option-1", "option-2"]);
        assert!(d.constraint(&ok).is_ok());
        assert!(d.constraint(&ok).is_ok());
    }
}
