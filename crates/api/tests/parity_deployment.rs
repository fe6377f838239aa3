//! Fireworks' `DeploymentSampler` over the `Sampler` trait: the `max_seq_len` pre- and
//! post-filters (with a sampler that counts calls), echo-aligned logprobs (`P + C - 1`, equal
//! to `compute_logprobs` of `full_tokens`), and identical tokens and logprobs to the in-process
//! `SamplingClient` for the same seed. Real-model tests use SmolLM2-135M-Instruct on candle.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use infermux::{
    ChatMessage, DeploymentSampler, FinishReason, ModelInput, ModelRegistry, PromptInput,
    SampleResponse, SampleWithTokensParams, SampledSequence, Sampler, SamplerFuture,
    SamplingClient, SamplingParams, ServiceClient, StopReason, Tokenizer,
};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_dir() -> PathBuf {
    let dir = std::env::var_os("INFERMUX_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or(repo().join("models/SmolLM2-135M-Instruct"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "run `cargo xtask setup` first ({} is missing)",
        dir.display()
    );
    dir
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_model_dir(model_dir()).unwrap()
}

/// One engine for the whole file, opened by its Hugging Face name through the registry.
fn client() -> SamplingClient {
    static CLIENT: OnceLock<SamplingClient> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            let models = model_dir().parent().unwrap().to_path_buf();
            ServiceClient::new()
                .with_registry(ModelRegistry::empty().with_models_dir(models))
                .create_sampling_client_from_base_model("HuggingFaceTB/SmolLM2-135M-Instruct")
                .expect("loading the model by name")
        })
        .clone()
}

/// A sampler that replies with canned sequences and counts its calls.
struct CannedSampler {
    calls: AtomicUsize,
    completions: Vec<Vec<u32>>,
    last_request: Mutex<Option<(usize, usize, SamplingParams, bool)>>,
}

impl CannedSampler {
    fn new(completions: Vec<Vec<u32>>) -> Arc<Self> {
        Arc::new(Self {
            calls: AtomicUsize::new(0),
            completions,
            last_request: Mutex::new(None),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Sampler for CannedSampler {
    fn sample(
        &self,
        prompt: ModelInput,
        num_samples: usize,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool,
        _topk: usize,
    ) -> SamplerFuture<SampleResponse> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let prompt_len = prompt.length();
        *self.last_request.lock().unwrap() = Some((
            prompt_len,
            num_samples,
            sampling_params,
            include_prompt_logprobs,
        ));
        // Prompt token i has logprob -(i as f32); completion token j of sample s has -(100 s + j).
        let sequences = self
            .completions
            .iter()
            .enumerate()
            .map(|(s, tokens)| SampledSequence {
                tokens: tokens.clone(),
                logprobs: Some((0..tokens.len()).map(|j| -((100 * s + j) as f32)).collect()),
                stop_reason: StopReason::Length,
                finish_reason: FinishReason::Length,
                stopped_by: None,
                text: None,
                processed_logprobs: None,
                top_logprobs: None,
            })
            .collect();
        let prompt_logprobs = include_prompt_logprobs.then(|| {
            (0..prompt_len)
                .map(|i| (i > 0).then_some(-(i as f32)))
                .collect()
        });
        SamplerFuture::ready(Ok(SampleResponse {
            sequences,
            prompt_logprobs,
            topk_prompt_logprobs: None,
            ..SampleResponse::default()
        }))
    }

    fn compute_logprobs(&self, _prompt: ModelInput) -> SamplerFuture<Vec<Option<f32>>> {
        unreachable!("DeploymentSampler never scores")
    }

    fn get_base_model(&self) -> String {
        "canned".into()
    }
}

#[test]
fn prompt_pre_filter_makes_no_inference_call() {
    let canned = CannedSampler::new(vec![vec![5, 6]]);
    let sampler = DeploymentSampler::from_shared(canned.clone(), tokenizer());
    assert_eq!(sampler.model(), "canned");
    let prompt = vec![10, 11, 12, 13];

    for max_seq_len in [4, 3, 1] {
        let params = SampleWithTokensParams {
            max_seq_len: Some(max_seq_len),
            ..Default::default()
        };
        let out = sampler
            .sample_with_tokens(prompt.clone(), &params)
            .wait()
            .unwrap();
        assert!(
            out.is_empty(),
            "prompt of 4 tokens, max_seq_len {max_seq_len}"
        );
    }
    assert_eq!(
        canned.calls(),
        0,
        "a filtered prompt must not reach the sampler"
    );

    // Messages are measured after the chat template: a long conversation is filtered too.
    let messages = vec![ChatMessage::user("Hi")];
    let rendered = sampler
        .tokenize(&PromptInput::from(messages.clone()), true)
        .unwrap();
    assert!(rendered.len() > 4, "{rendered:?}");
    let params = SampleWithTokensParams {
        max_seq_len: Some(rendered.len()),
        ..Default::default()
    };
    assert!(
        sampler
            .sample_with_tokens(messages.clone(), &params)
            .wait()
            .unwrap()
            .is_empty()
    );
    assert_eq!(canned.calls(), 0);

    // One token of room: the call is made.
    let params = SampleWithTokensParams {
        max_seq_len: Some(rendered.len() + 1),
        ..Default::default()
    };
    let _ = sampler
        .sample_with_tokens(messages, &params)
        .wait()
        .unwrap();
    assert_eq!(canned.calls(), 1);
}

#[test]
fn completion_post_filter_drops_what_exceeds_max_seq_len() {
    let canned = CannedSampler::new(vec![vec![1; 2], vec![1; 5], vec![1; 8], vec![1; 6]]);
    let sampler = DeploymentSampler::from_shared(canned.clone(), tokenizer());
    let prompt: Vec<u32> = vec![10, 11, 12];
    let params = SampleWithTokensParams {
        n: 4,
        max_tokens: Some(8),
        logprobs: true,
        max_seq_len: Some(3 + 6),
        ..Default::default()
    };
    let out = sampler
        .sample_with_tokens(prompt.clone(), &params)
        .wait()
        .unwrap();
    assert_eq!(canned.calls(), 1);
    let lens: Vec<usize> = out.iter().map(|c| c.completion_len).collect();
    assert_eq!(
        lens,
        [2, 5, 6],
        "prompt + completion == max_seq_len is kept, more is dropped"
    );
    for c in &out {
        assert_eq!(c.prompt_len, 3);
        assert_eq!(&c.full_tokens[..3], &prompt[..]);
        assert_eq!(c.full_tokens.len(), c.prompt_len + c.completion_len);
        assert_eq!(c.completion_tokens().len(), c.completion_len);
        assert_eq!(
            c.inference_logprobs.as_ref().unwrap().len(),
            c.completion_len
        );
        assert!(!c.logprobs_echoed);
        assert_eq!(c.routing_matrices, None);
        assert_eq!(c.finish_reason, StopReason::Length);
    }
    // The fourth canned sequence (index 3) survived with its own logprobs.
    assert_eq!(out[2].inference_logprobs.as_ref().unwrap()[0], -300.0);

    let (prompt_len, n, params_sent, prompt_logprobs) =
        canned.last_request.lock().unwrap().clone().unwrap();
    assert_eq!((prompt_len, n, prompt_logprobs), (3, 4, false));
    assert_eq!(params_sent.max_tokens, Some(8));
    assert_eq!(params_sent.n, 4);
}

#[test]
fn echo_gives_prompt_then_completion_logprobs() {
    let canned = CannedSampler::new(vec![vec![7, 8], vec![9]]);
    let sampler = DeploymentSampler::from_shared(canned.clone(), tokenizer());
    let params = SampleWithTokensParams {
        n: 2,
        echo: true,
        ..Default::default()
    };
    let out = sampler
        .sample_with_tokens(vec![10u32, 11, 12], &params)
        .wait()
        .unwrap();
    assert!(canned.last_request.lock().unwrap().as_ref().unwrap().3);
    assert_eq!(out.len(), 2);
    assert_eq!(
        out[0].inference_logprobs.as_deref(),
        Some(&[-1.0, -2.0, 0.0, -1.0][..]),
        "P + C - 1 = 3 + 2 - 1 entries: prompt positions 1.. then the completion"
    );
    assert_eq!(
        out[1].inference_logprobs.as_deref(),
        Some(&[-1.0, -2.0, -100.0][..])
    );
    assert!(out.iter().all(|c| c.logprobs_echoed));

    // Without logprobs or echo, no logprobs are returned.
    let out = sampler
        .sample_with_tokens(vec![10u32, 11, 12], &SampleWithTokensParams::default())
        .wait()
        .unwrap();
    assert!(
        out.iter()
            .all(|c| c.inference_logprobs.is_none() && !c.logprobs_echoed)
    );
}

#[test]
fn echo_logprobs_equal_compute_logprobs_of_full_tokens() {
    let client = client();
    assert_eq!(
        client.get_base_model(),
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    );
    let sampler = DeploymentSampler::from_client(client.clone());
    let messages = vec![ChatMessage::user("Name a color.")];
    let params = SampleWithTokensParams {
        n: 2,
        max_tokens: Some(6),
        temperature: 1.0,
        seed: Some(5),
        echo: true,
        ..Default::default()
    };
    let out = sampler
        .sample_with_tokens(messages.clone(), &params)
        .wait()
        .unwrap();
    assert_eq!(out.len(), 2);
    let tok = client.get_tokenizer();
    let want_prompt = tok
        .encode(&tok.apply_chat_template(&messages, true).unwrap(), false)
        .unwrap();
    let mut max_delta = 0f32;
    for c in &out {
        assert_eq!(&c.full_tokens[..c.prompt_len], &want_prompt[..]);
        let lps = c.inference_logprobs.as_ref().unwrap();
        assert_eq!(lps.len(), c.prompt_len + c.completion_len - 1);
        assert!(c.logprobs_echoed);
        let scored = client
            .compute_logprobs(ModelInput::from_ints(c.full_tokens.clone()))
            .wait()
            .unwrap();
        assert_eq!(scored.len(), c.full_tokens.len());
        assert_eq!(scored[0], None);
        for (i, (a, b)) in lps.iter().zip(&scored[1..]).enumerate() {
            let d = (a - b.unwrap()).abs();
            max_delta = max_delta.max(d);
            assert!(d <= 1e-4, "position {}: echoed {a} vs scored {b:?}", i + 1);
        }
    }
    eprintln!("echo vs compute_logprobs: max |delta| = {max_delta:e}");
}

#[test]
fn deployment_sampler_matches_sampling_client_for_the_same_seed() {
    let client = client();
    let tok = client.get_tokenizer();
    let text = "The capital of France is";
    let prompt = tok.encode(text, false).unwrap();
    let sampling = SamplingParams {
        max_tokens: Some(8),
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(42),
        ..Default::default()
    };
    let direct = client
        .sample(ModelInput::from_ints(prompt.clone()), 3, sampling, false, 0)
        .wait()
        .unwrap();

    let sampler = DeploymentSampler::from_client(client.clone());
    let params = SampleWithTokensParams {
        n: 3,
        max_tokens: Some(8),
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(42),
        logprobs: true,
        ..Default::default()
    };
    // Awaited inside async code this time (the same future also `.wait()`s).
    let fut = sampler.sample_with_tokens(text, &params);
    let via_deployment = SamplerFuture::new(async move {
        let out = fut.await?;
        assert!(!out.is_empty());
        Ok(out)
    })
    .wait()
    .unwrap();

    assert_eq!(via_deployment.len(), 3);
    for (seq, c) in direct.sequences.iter().zip(&via_deployment) {
        assert_eq!(c.prompt_len, prompt.len());
        assert_eq!(c.completion_tokens(), &seq.tokens[..]);
        assert_eq!(c.inference_logprobs.as_ref(), seq.logprobs.as_ref());
        assert_eq!(c.finish_reason, seq.stop_reason);
        assert_eq!(Some(&c.text), seq.text.as_ref());
    }
    let distinct: std::collections::HashSet<_> =
        direct.sequences.iter().map(|s| s.tokens.clone()).collect();
    assert!(
        distinct.len() > 1,
        "3 seeded samples at T=0.9 should differ"
    );
}

#[test]
fn one_sampler_shared_across_threads_is_reproducible() {
    let sampler = DeploymentSampler::from_client(client());
    let params = SampleWithTokensParams {
        max_tokens: Some(4),
        seed: Some(9),
        logprobs: true,
        ..Default::default()
    };
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let s = sampler.clone();
            let p = params.clone();
            std::thread::spawn(move || s.sample_with_tokens("Once upon a time", &p).wait())
        })
        .collect();
    let outs: Vec<_> = runs
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();
    assert!(outs.windows(2).all(|w| w[0] == w[1]), "{outs:?}");
}

#[test]
fn post_filter_on_the_real_model() {
    let sampler = DeploymentSampler::from_client(client());
    let prompt = sampler.tokenize(&"Hello".into(), true).unwrap();
    let params = |max_seq_len| SampleWithTokensParams {
        n: 2,
        max_tokens: Some(5),
        ignore_eos: true,
        seed: Some(1),
        max_seq_len: Some(max_seq_len),
        ..Default::default()
    };
    let kept = sampler
        .sample_with_tokens("Hello", &params(prompt.len() + 5))
        .wait()
        .unwrap();
    assert_eq!(kept.len(), 2);
    assert!(kept.iter().all(|c| c.full_tokens.len() == prompt.len() + 5));
    let dropped = sampler
        .sample_with_tokens("Hello", &params(prompt.len() + 4))
        .wait()
        .unwrap();
    assert!(dropped.is_empty());
}
