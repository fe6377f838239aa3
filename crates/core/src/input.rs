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

    /// Number of positions the input occupies (images count their expected tokens), saturating
    /// at `usize::MAX`: `expected_tokens` is client-supplied, so a sum may not fit. Use
    /// [`ModelInput::checked_length`] to get an error instead.
    pub fn length(&self) -> usize {
        self.checked_length().unwrap_or(usize::MAX)
    }

    /// Number of positions the input occupies, or an error naming `expected_tokens` when the
    /// client-supplied image sizes make the sum overflow.
    pub fn checked_length(&self) -> Result<usize, ValidationError> {
        self.chunks.iter().try_fold(0usize, |total, c| {
            let n = match c {
                ModelInputChunk::EncodedText { tokens } => tokens.len(),
                ModelInputChunk::Image(img) => img.expected_tokens.unwrap_or(0),
            };
            total.checked_add(n).ok_or_else(|| {
                ValidationError::field(
                    "expected_tokens",
                    format!("the chunks' positions add up past {}", usize::MAX),
                )
            })
        })
    }

    /// The flattened token ids of a text-only input; any other chunk is an error naming it.
    ///
    /// Images are rejected before anything is counted or allocated, so client-supplied
    /// `expected_tokens` never feeds an allocation; the output reserves only the text tokens
    /// that are actually present.
    pub fn to_text_tokens(&self) -> Result<Vec<TokenId>, ValidationError> {
        let mut text_len = 0usize;
        for (index, chunk) in self.chunks.iter().enumerate() {
            match chunk {
                ModelInputChunk::EncodedText { tokens } => text_len += tokens.len(),
                ModelInputChunk::Image(_) => {
                    return Err(ValidationError::UnsupportedChunk {
                        index,
                        kind: "an image chunk",
                    });
                }
            }
        }
        let mut out = Vec::with_capacity(text_len);
        for chunk in &self.chunks {
            if let ModelInputChunk::EncodedText { tokens } = chunk {
                out.extend_from_slice(tokens);
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
    fn hostile_expected_tokens_neither_overflow_nor_allocate() {
        let huge = |n| {
            ModelInputChunk::Image(ImageChunk {
                data: vec![],
                format: ImageFormat::Jpeg,
                expected_tokens: Some(n),
            })
        };
        // One image of usize::MAX positions before the text: rejected by index, no allocation.
        let input = ModelInput::default()
            .with_chunk(huge(usize::MAX))
            .with_chunk(ModelInputChunk::EncodedText { tokens: vec![1] });
        assert_eq!(
            input.to_text_tokens(),
            Err(ValidationError::UnsupportedChunk {
                index: 0,
                kind: "an image chunk"
            })
        );
        assert_eq!(input.length(), usize::MAX);
        let err = input.checked_length().unwrap_err();
        assert!(
            matches!(
                err,
                ValidationError::InvalidField {
                    field: "expected_tokens",
                    ..
                }
            ),
            "{err}"
        );
        // Two images whose sizes only overflow together.
        let two = ModelInput::default()
            .with_chunk(huge(usize::MAX / 2 + 1))
            .with_chunk(huge(usize::MAX / 2 + 1));
        assert!(two.checked_length().is_err());
        assert_eq!(two.length(), usize::MAX);
        let fits = ModelInput::default().with_chunk(huge(usize::MAX - 1));
        assert_eq!(fits.checked_length(), Ok(usize::MAX - 1));
    }

    #[test]
    fn serde_uses_tagged_chunks() {
        let json = serde_json::to_string(&ModelInput::from_ints(vec![5])).unwrap();
        assert_eq!(json, r#"{"chunks":[{"type":"encoded_text","tokens":[5]}]}"#);
    }
}
