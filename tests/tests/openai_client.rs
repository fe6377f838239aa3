//! The official `openai` Python client against the infermux server (in process, real model):
//! completions, chat, streaming, logprobs, n > 1, echo, `response_format` and errors.
//!
//! The client lives in `runtimes/py-openai` (`cargo xtask setup` installs it; `cargo xtask test`
//! runs setup first). Without it the test fails: a missing runtime is never a silent pass.

use std::process::Command;

use infermux::ServiceClient;
use infermux::server::{self, ServerConfig};

#[test]
fn the_official_openai_client_works_against_the_server() {
    let root = infermux_tests::repo_root();
    let python = root.join("runtimes/py-openai/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run `cargo xtask setup` to install the openai client",
        python.display()
    );
    let client = ServiceClient::new()
        .create_sampling_client(infermux_tests::model_dir())
        .expect("loading the reference model");
    let model = client.get_base_model();
    let handle = server::spawn(client, &ServerConfig::default(), "127.0.0.1:0").expect("serving");
    let status = Command::new(&python)
        .arg(root.join("tests/data/openai_client_check.py"))
        .args([
            "--base-url",
            &format!("{}/v1", handle.url()),
            "--model",
            &model,
        ])
        .status()
        .expect("running the openai client script");
    assert!(
        status.success(),
        "the openai client checks failed ({status})"
    );
    handle.shutdown().expect("server shutdown");
}
