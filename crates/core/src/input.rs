//! What a request feeds the model: a sequence of chunks, as in Tinker's `ModelInput`.

use serde::{Deserialize, Serialize};

use crate::TokenId;
use crate::error::ValidationError;

/// A tokenized prompt made of chunks (text tokens, images).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelInput {
    /// The chunks, in order.
    pub chunks: Vec<ModelInputChunk>,
}

/// One piece of a [`ModelInput`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ModelInputChunk {
    /// Token ids of encoded text.
    EncodedText {
        /// The ids.
        tokens: Vec<TokenId>,
    },
    /// An encoded image; only multimodal models accept it.
    Image(ImageChunk),
}

/// An image as bytes in a container format, with the number of tokens it expands to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageChunk {
    /// The encoded image bytes.
    pub data: Vec<u8>,
    /// Container format of `data`.
    pub format: ImageFormat,
    /// How many model positions the image occupies, if known.
    pub expected_tokens: Option<usize>,
}

/// Image container formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// PNG.
    Png,
    /// JPEG.
    Jpeg,
}

impl ModelInput {
    /// A single text chunk holding `tokens`.
    pub fn from_ints(tokens: impl Into<Vec<TokenId>>) -> Self {
        Self {
            chunks: vec![ModelInputChunk::EncodedText {
                tokens: tokens.into(),
            }],
        }
    }

    /// Appends a chunk, builder style.
    pub fn with_chunk(mut self, chunk: ModelInputChunk) -> Self {
        self.chunks.push(chunk);
        self
    }

    /// Number of positions the input occupies (images count their expected tokens).
    pub fn length(&self) -> usize {
        self.chunks
            .iter()
            .map(|c| match c {
                ModelInputChunk::EncodedText { tokens } => tokens.len(),
                ModelInputChunk::Image(img) => img.expected_tokens.unwrap_or(0),
            })
            .sum()
    }

    /// The flattened token ids of a text-only input; any other chunk is an error naming it.
    pub fn to_text_tokens(&self) -> Result<Vec<TokenId>, ValidationError> {
        let mut out = Vec::with_capacity(self.length());
        for (index, chunk) in self.chunks.iter().enumerate() {
            match chunk {
                ModelInputChunk::EncodedText { tokens } => out.extend_from_slice(tokens),
                ModelInputChunk::Image(_) => {
                    return Err(ValidationError::UnsupportedChunk {
                        index,
                        kind: "an image chunk",
                    });
                }
            }
        }
        Ok(out)
    }
}

impl From<Vec<TokenId>> for ModelInput {
    fn from(tokens: Vec<TokenId>) -> Self {
        Self::from_ints(tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_chunks_flatten_in_order() {
        let input = ModelInput::from_ints(vec![1, 2])
            .with_chunk(ModelInputChunk::EncodedText { tokens: vec![3] });
        assert_eq!(input.to_text_tokens().unwrap(), vec![1, 2, 3]);
        assert_eq!(input.length(), 3);
    }

    #[test]
    fn image_chunk_is_rejected_by_index() {
        let image = ImageChunk {
            data: vec![0x89],
            format: ImageFormat::Png,
            expected_tokens: Some(4),
        };
        let input = ModelInput::from_ints(vec![1]).with_chunk(ModelInputChunk::Image(image));
        assert_eq!(input.length(), 5);
        assert_eq!(
            input.to_text_tokens(),
            Err(ValidationError::UnsupportedChunk {
                index: 1,
                kind: "an image chunk"
            })
        );
    }

    #[test]
    fn serde_uses_tagged_chunks() {
        let json = serde_json::to_string(&ModelInput::from_ints(vec![5])).unwrap();
        assert_eq!(json, r#"{"chunks":[{"type":"encoded_text","tokens":[5]}]}"#);
    }
}
