//! Chat templates: the model's Jinja `chat_template` from `tokenizer_config.json`, rendered with
//! minijinja (plus Python string methods, as Hugging Face templates use them).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, …
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
}

/// A model's chat template with the special tokens it refers to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

#[derive(Deserialize)]
struct TokenizerConfig {
    chat_template: Option<TemplateField>,
    bos_token: Option<TokenField>,
    eos_token: Option<TokenField>,
}

/// `chat_template` is a string, or a list of named templates (the one named "default" wins).
#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

/// A special token written as a string or as an `AddedToken` object.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenField {
    Plain(String),
    Added { content: String },
}

impl TokenField {
    fn into_string(self) -> String {
        match self {
            Self::Plain(s) | Self::Added { content: s } => s,
        }
    }
}

impl ChatTemplate {
    /// Reads the template of a model folder; `Ok(None)` if it has none.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer_config.json");
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let config: TokenizerConfig = serde_json::from_str(&text)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self::from_config(config))
    }

    /// The template of a `tokenizer_config.json` value (`source` names it in errors).
    pub fn from_config_json(config: &serde_json::Value, source: &Path) -> Result<Option<Self>> {
        let config = TokenizerConfig::deserialize(config)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", source.display())))?;
        Ok(Self::from_config(config))
    }

    fn from_config(config: TokenizerConfig) -> Option<Self> {
        let source = match config.chat_template {
            None => return None,
            Some(TemplateField::One(s)) => s,
            Some(TemplateField::Named(list)) => {
                list.into_iter().find(|t| t.name == "default")?.template
            }
        };
        let token = |t: Option<TokenField>| t.map(TokenField::into_string).unwrap_or_default();
        Some(Self {
            source,
            bos_token: token(config.bos_token),
            eos_token: token(config.eos_token),
        })
    }

    /// Renders `messages`; `add_generation_prompt` appends the assistant turn's opening.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let template = env
            .template_from_str(&self.source)
            .map_err(|e| Error::Tokenizer(format!("chat template does not compile: {e}")))?;
        template
            .render(minijinja::context! {
                messages => minijinja::value::Serde(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| Error::Tokenizer(format!("chat template failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_chatml_template_with_generation_prompt() {
        let t = ChatTemplate {
            source: "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}\
                     {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
                .into(),
            bos_token: String::new(),
            eos_token: "<|im_end|>".into(),
        };
        let out = t.render(&[ChatMessage::user(" Hi ")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(
            !t.render(&[ChatMessage::user("Hi")], false)
                .unwrap()
                .ends_with("assistant\n")
        );
    }

    #[test]
    fn template_errors_are_reported_not_panicked() {
        let t = ChatTemplate {
            source: "{{ raise_exception('no system role') }}".into(),
            bos_token: String::new(),
            eos_token: String::new(),
        };
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("no system role"), "{err}");
    }
}
