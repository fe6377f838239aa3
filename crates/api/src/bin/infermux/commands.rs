//! What each subcommand does.

use anyhow::{Context, Result};
use infermux::{
    BeamSearchParams, ChatMessage, GuidedDecodingParams, LoadOptions, ModelInput, SamplingClient,
    SamplingParams, ServiceClient, TokenId,
};
use serde_json::json;

use crate::args::{
    ChatArgs, Cli, Command, GuidedArgs, LogprobsArgs, ModelArgs, PromptArgs, SampleArgs, ServeArgs,
};

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Sample(args) => sample(args),
        Command::Logprobs(args) => logprobs(args),
        Command::Serve(args) => serve(args),
    }
}

fn client(args: &ModelArgs, lora: Option<&std::path::Path>) -> Result<SamplingClient> {
    client_with(args, infermux::EngineConfig::default(), lora)
}

/// A client on `args.model`, on the PEFT adapter at `lora` when given (onnx merges it into
/// the weights at load; the others load it into the engine).
fn client_with(
    args: &ModelArgs,
    engine: infermux::EngineConfig,
    lora: Option<&std::path::Path>,
) -> Result<SamplingClient> {
    let options = LoadOptions {
        backend: args.backend,
        device: args.device,
        dtype: args.dtype,
        engine,
    };
    let service = ServiceClient::with_options(options);
    let loading = || format!("loading {} on {}", args.model.display(), args.backend);
    match lora {
        Some(path) => service
            .create_lora_sampling_client(&args.model, path)
            .with_context(|| format!("--lora {}", path.display()))
            .with_context(loading),
        None => service
            .create_sampling_client(&args.model)
            .with_context(loading),
    }
}

fn prompt_tokens(
    client: &SamplingClient,
    prompt: &PromptArgs,
    chat: &ChatArgs,
) -> Result<Vec<TokenId>> {
    match (&prompt.prompt, &prompt.prompt_tokens) {
        (Some(text), _) if chat.chat => {
            let tokenizer = client.get_tokenizer();
            let rendered =
                tokenizer.apply_chat_template(&[ChatMessage::user(text.as_str())], true)?;
            Ok(tokenizer.encode(&rendered, false)?)
        }
        (Some(text), _) => Ok(client.get_tokenizer().encode(text, false)?),
        (None, Some(ids)) => Ok(ids.clone()),
        (None, None) => anyhow::bail!("give --prompt or --prompt-tokens"),
    }
}

fn sample(args: SampleArgs) -> Result<()> {
    let client = client(&args.model, args.lora.as_deref())?;
    let tokens = prompt_tokens(&client, &args.prompt, &args.chat)?;
    let prompt = ModelInput::from_ints(tokens.clone());
    let response = match args.beam_width {
        Some(width) => {
            let params = BeamSearchParams {
                temperature: args.temperature,
                ignore_eos: args.ignore_eos,
                ..BeamSearchParams::new(width, args.max_tokens)
            };
            client.beam_search(prompt, params).wait()?
        }
        None => {
            let params = SamplingParams {
                temperature: args.temperature,
                top_p: args.top_p,
                top_k: args.top_k,
                min_p: args.min_p,
                seed: args.seed,
                max_tokens: Some(args.max_tokens),
                ignore_eos: args.ignore_eos,
                stop: args.stop.clone(),
                logprobs: args.logprobs,
                guided_decoding: guided_params(&args.guided)?,
                ..SamplingParams::default()
            };
            client
                .sample(prompt, args.num_samples, params, false, 0)
                .wait()?
        }
    };
    let tokenizer = client.get_tokenizer();
    let text_of = |s: &infermux::SampledSequence| match &s.text {
        Some(text) => Ok(text.clone()),
        None => tokenizer.decode(&s.tokens, true),
    };
    if args.json {
        let samples = response
            .sequences
            .iter()
            .map(|s| {
                let mut sample = json!({
                    "tokens": s.tokens,
                    "text": text_of(s)?,
                    "logprobs": s.logprobs,
                    "finish_reason": s.stop_reason,
                    "finish_detail": s.finish_reason,
                });
                if let Some(top) = &s.top_logprobs {
                    sample["top_logprobs"] = json!(top);
                }
                if let Some(by) = &s.stopped_by {
                    sample["stopped_by"] = json!(by);
                }
                Ok(sample)
            })
            .collect::<Result<Vec<_>>>()?;
        println!(
            "{}",
            json!({
                "prompt_tokens": tokens,
                "samples": samples,
                "policy_version": response.policy_version,
            })
        );
        return Ok(());
    }
    let many = response.sequences.len() > 1;
    for (i, s) in response.sequences.iter().enumerate() {
        if many {
            println!("--- sample {i} ({}) ---", s.finish_reason.as_openai_str());
        }
        println!("{}", text_of(s)?);
    }
    Ok(())
}

/// The guided-decoding constraint the flags ask for, files read.
fn guided_params(args: &GuidedArgs) -> Result<Option<GuidedDecodingParams>> {
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    Ok(if let Some(path) = &args.json_schema {
        let schema: serde_json::Value = serde_json::from_str(&read(path)?)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        Some(GuidedDecodingParams::json_schema(schema))
    } else if let Some(re) = &args.regex {
        Some(GuidedDecodingParams::regex(re.clone()))
    } else if let Some(choice) = &args.choice {
        Some(GuidedDecodingParams::choice(choice.clone()))
    } else if let Some(path) = &args.grammar {
        Some(GuidedDecodingParams::grammar(read(path)?))
    } else {
        None
    })
}

fn logprobs(args: LogprobsArgs) -> Result<()> {
    let client = client(&args.model, args.lora.as_deref())?;
    let tokens = prompt_tokens(&client, &args.prompt, &args.chat)?;
    let scored = client.score(ModelInput::from_ints(tokens.clone())).wait()?;
    let logprobs = scored.logprobs;
    if args.json {
        println!(
            "{}",
            json!({ "logprobs": logprobs, "policy_version": scored.policy_version })
        );
        return Ok(());
    }
    let tokenizer = client.get_tokenizer();
    for (token, lp) in tokens.iter().zip(&logprobs) {
        let piece = tokenizer.decode(&[*token], false)?;
        match lp {
            Some(lp) => println!("{token}\t{lp:.6}\t{piece:?}"),
            None => println!("{token}\t-\t{piece:?}"),
        }
    }
    Ok(())
}

/// The control routes' setup, when enabled: the allowed folder must exist (resolved once here
/// so a typo fails at start, not at the first update).
fn control_config(args: &ServeArgs) -> Result<Option<infermux::server::ControlConfig>> {
    if !args.enable_control_routes {
        return Ok(None);
    }
    let (Some(admin_key), Some(dir)) = (&args.admin_key, &args.allowed_model_dir) else {
        anyhow::bail!("--enable-control-routes needs --admin-key and --allowed-model-dir");
    };
    let allowed_model_dir = dir
        .canonicalize()
        .with_context(|| format!("--allowed-model-dir {}", dir.display()))?;
    anyhow::ensure!(
        allowed_model_dir.is_dir(),
        "--allowed-model-dir {} is not a folder",
        dir.display()
    );
    Ok(Some(infermux::server::ControlConfig {
        admin_key: admin_key.clone(),
        allowed_model_dir,
    }))
}

fn serve(args: ServeArgs) -> Result<()> {
    use infermux::server::{self, Limits, ServerConfig};
    use std::io::Write;

    let engine = infermux::EngineConfig {
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        kv_budget_bytes: args.kv_cache_memory_bytes,
        prefix_caching: !args.no_enable_prefix_caching,
        max_loras: args.max_loras,
    };
    if args.model.backend == infermux::BackendKind::Onnx && !args.lora_modules.is_empty() {
        anyhow::bail!(
            "--lora-modules: the onnx backend does not run adapters per request (its graph \
             holds the weights); `infermux sample|logprobs --lora DIR` merges one into the \
             weights at load, and candle and torch serve adapters per request"
        );
    }
    let client = client_with(&args.model, engine, None)?;
    for (name, path) in &args.lora_modules {
        let info = client
            .engine()
            .load_adapter(name, path)
            .wait()
            .with_context(|| format!("--lora-modules {name}={}", path.display()))?;
        eprintln!(
            "LoRA adapter {name}: rank {}, {} ({} parameters)",
            info.rank,
            info.targets.join(", "),
            info.num_params
        );
    }
    // On stderr: stdout's first line is `listening on ...`, which scripts and tests wait for.
    let budget = client.engine().kv_budget_bytes();
    let source = match args.kv_cache_memory_bytes {
        Some(_) => "--kv-cache-memory-bytes".to_string(),
        None => format!(
            "default: {}% of available memory",
            infermux_core::engine::budget::DEFAULT_KV_MEMORY_PERCENT
        ),
    };
    eprintln!(
        "kv cache budget: {budget} bytes ({:.2} GiB, {source})",
        budget as f64 / (1u64 << 30) as f64
    );
    let config = ServerConfig {
        limits: Limits {
            max_concurrent_requests: args.max_concurrent_requests,
            max_concurrent_sequences: args.max_concurrent_sequences,
            max_queue: args.max_queue,
            max_body_bytes: args.max_body_bytes,
            request_timeout: (args.request_timeout_secs > 0)
                .then(|| std::time::Duration::from_secs(args.request_timeout_secs)),
            sse_keep_alive: (args.sse_keep_alive_secs > 0)
                .then(|| std::time::Duration::from_secs(args.sse_keep_alive_secs)),
            max_sequences_per_request: args.max_sequences_per_request,
        },
        served_model_name: args.served_model_name.clone(),
        api_key: args.api_key.clone(),
        control: control_config(&args)?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr()?;
        let host = match local {
            std::net::SocketAddr::V6(a) => format!("[{}]", a.ip()),
            std::net::SocketAddr::V4(a) => a.ip().to_string(),
        };
        println!("listening on http://{host}:{}", local.port());
        std::io::stdout().flush()?;
        server::serve_model(listener, client, &config, server::shutdown_signal())
            .await
            .context("serving")
    })
}
