//! Embedding infermux in your own tokio/axum service: the server module's router nested under
//! `/llm`, next to a hand-written handler that calls the `SamplingClient` directly.
//!
//! ```sh
//! cargo run -p infermux --example serve_embedded -- models/SmolLM2-135M-Instruct [candle|torch|onnx]
//! curl -s localhost:8080/llm/v1/completions -d '{"prompt": "The capital of France is", "max_tokens": 5}'
//! curl -s localhost:8080/hello
//! ```

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use infermux::server::{self, ServerConfig};
use infermux::{
    BackendKind, LoadOptions, ModelInput, SamplingClient, SamplingParams, ServiceClient,
};

/// A handler of your own: greedy five tokens after "Hello," through the client.
async fn hello(State(client): State<SamplingClient>) -> String {
    let tokenizer = client.get_tokenizer();
    let Ok(ids) = tokenizer.encode("Hello,", false) else {
        return "tokenizer error".into();
    };
    let params = SamplingParams::greedy(5);
    match client
        .sample(ModelInput::from_ints(ids), 1, params, false, 0)
        .await
    {
        Ok(r) => r.sequences[0].text.clone().unwrap_or_default(),
        Err(e) => format!("error: {e}"),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .unwrap_or_else(|| "models/SmolLM2-135M-Instruct".into());
    let backend: BackendKind = args.next().as_deref().unwrap_or("candle").parse()?;
    let options = LoadOptions {
        backend,
        ..LoadOptions::default()
    };
    let client = ServiceClient::with_options(options).create_sampling_client(&model)?;

    let app = Router::new()
        .route("/hello", get(hello))
        .with_state(client.clone())
        .nest("/llm", server::router(client, &ServerConfig::default()));

    tokio::runtime::Runtime::new()?.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
        println!("listening on http://{}", listener.local_addr()?);
        server::serve(listener, app, server::shutdown_signal()).await?;
        Ok(())
    })
}
