//! An RL-style loop: sample a group of completions per prompt (seeded), score each
//! prompt + completion with `compute_logprobs` as a trainer would, and check that the sampler's
//! logprobs agree with the scorer's (the importance ratio of an on-policy step is 1).
//!
//! ```sh
//! cargo run -p infermux --example rl_loop                       # models/SmolLM2-135M-Instruct
//! cargo run -p infermux --example rl_loop -- HuggingFaceTB/SmolLM2-135M-Instruct 3
//! cargo run -p infermux --example rl_loop -- --remote http://127.0.0.1:8000  # `infermux serve`
//! ```
//!
//! The model is a registry name (models folder, `$INFERMUX_MODELS_DIR` or the Hugging Face
//! cache) or a model folder. With `--remote URL` the same loop samples and scores over HTTP
//! through the `Sampler` trait, tokenizing on the client.

use std::sync::Arc;

use infermux::{
    ChatMessage, DeploymentSampler, ModelInput, ModelSource, PromptInput, RemoteSamplingClient,
    SampleWithTokensParams, Sampler, ServiceClient,
};

const PROMPTS: [&str; 2] = ["Name a primary color.", "What is 2 + 3?"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (sampler, tokenizer): (Arc<dyn Sampler>, _) = match args.first().map(String::as_str) {
        Some("--remote") => {
            let url = args.get(1).ok_or("--remote needs a URL")?;
            let model = args.get(2).map_or("SmolLM2-135M-Instruct", String::as_str);
            // The tokenizer must be the served model's: load it from the local copy.
            let service = ServiceClient::new();
            let dir = service.registry().resolve(model)?;
            let tokenizer = infermux::Tokenizer::from_model_dir(dir)?;
            let remote = RemoteSamplingClient::new(url)?.with_model(model);
            (Arc::new(remote), tokenizer)
        }
        name => {
            let name = name.unwrap_or("SmolLM2-135M-Instruct");
            let source = if std::path::Path::new(name).is_dir() {
                ModelSource::model_path(name)
            } else {
                ModelSource::base_model(name)
            };
            let client = ServiceClient::new().create_sampling_client_from(source)?;
            let tokenizer = client.get_tokenizer();
            (Arc::new(client), tokenizer)
        }
    };
    let steps: u64 = match args.first().map(String::as_str) {
        Some("--remote") => args.get(3),
        _ => args.get(1),
    }
    .map(|s| s.parse())
    .transpose()?
    .unwrap_or(2);

    let policy = DeploymentSampler::from_shared(sampler.clone(), tokenizer);
    println!("model: {}", sampler.get_base_model());
    let mut worst = 0f32;
    for step in 0..steps {
        let mut step_max = 0f32;
        for (p, prompt) in PROMPTS.iter().enumerate() {
            let params = SampleWithTokensParams {
                n: 4,
                max_tokens: Some(12),
                temperature: 1.0,
                seed: Some(1000 * step + p as u64),
                echo: true,
                max_seq_len: Some(256),
                ..Default::default()
            };
            let messages = PromptInput::Messages(vec![ChatMessage::user(*prompt)]);
            let group = policy.sample_with_tokens(messages, &params).wait()?;
            let mut rewards = Vec::new();
            for c in &group {
                // The trainer's forward pass: logprobs of full_tokens[1..] given their prefix.
                let scored = sampler
                    .compute_logprobs(ModelInput::from_ints(c.full_tokens.clone()))
                    .wait()?;
                let sampled = c.inference_logprobs.as_ref().ok_or("no logprobs")?;
                assert_eq!(sampled.len(), c.prompt_len + c.completion_len - 1);
                for (a, b) in sampled.iter().zip(&scored[1..]) {
                    step_max = step_max.max((a - b.unwrap_or(f32::NAN)).abs());
                }
                // A toy reward: short answers score higher.
                rewards.push(1.0 / (1.0 + c.completion_len as f32));
            }
            let mean = rewards.iter().sum::<f32>() / rewards.len().max(1) as f32;
            let texts: Vec<String> = group.iter().map(|c| format!("{:?}", c.text)).collect();
            println!(
                "step {step} prompt {p}: mean reward {mean:.3}; {}",
                texts.join(" | ")
            );
        }
        println!("step {step}: max |sampled - scored logprob| = {step_max:.2e}");
        worst = worst.max(step_max);
    }
    println!("max |Δ| over all steps: {worst:.2e}");
    if worst > 1e-4 {
        return Err(format!("sampler and scorer disagree by {worst:e}").into());
    }
    Ok(())
}
