//! Avatar images: accepted only if the header says PNG, JPEG or WebP with
//! dimensions within the limit (a "decompression bomb" — a tiny file
//! declaring huge dimensions — is refused), and addressed by SHA-256.

use crate::{config::Limits, error::Error, Result};
use imagesize::ImageType;
use proto::profile::AvatarHash;
use sha2::{Digest, Sha256};

/// Check `image` against `limits`; its content address if accepted.
pub fn check(image: &[u8], limits: &Limits) -> Result<AvatarHash> {
    if image.len() > limits.avatar_bytes_max {
        return Err(Error::ImageTooLarge {
            len: image.len(),
            max: limits.avatar_bytes_max,
        });
    }
    let kind = imagesize::image_type(image)
        .map_err(|e| Error::BadImage(format!("unrecognised image: {e}")))?;
    if !matches!(kind, ImageType::Png | ImageType::Jpeg | ImageType::Webp) {
        return Err(Error::BadImage(format!(
            "{kind:?} is not accepted (PNG, JPEG or WebP only)"
        )));
    }
    let size =
        imagesize::blob_size(image).map_err(|e| Error::BadImage(format!("bad header: {e}")))?;
    let max = limits.avatar_dimension_max as usize;
    if size.width == 0 || size.height == 0 || size.width > max || size.height > max {
        return Err(Error::BadImage(format!(
            "{} x {} pixels is outside 1..={max} on a side",
            size.width, size.height
        )));
    }
    Ok(hash(image))
}

pub fn hash(image: &[u8]) -> AvatarHash {
    Sha256::digest(image).into()
}

/// Hex form of a hash, for logs and tools.
pub fn hex(hash: &AvatarHash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// Test images (also used by the integration tests and imctl's tests).
pub mod samples {
    /// A PNG header (signature + IHDR) declaring `width` x `height`,
    /// followed by `pad` zero bytes.
    pub fn png(width: u32, height: u32, pad: usize) -> Vec<u8> {
        let mut v = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        v.extend_from_slice(&width.to_be_bytes());
        v.extend_from_slice(&height.to_be_bytes());
        v.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
        v.resize(v.len() + pad, 0);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proto::profile::ErrorCode;

    #[test]
    fn accepts_small_png_and_refuses_the_rest() {
        let l = Limits::default();
        let ok = samples::png(64, 64, 100);
        assert_eq!(check(&ok, &l).unwrap(), hash(&ok));
        let bomb = samples::png(100_000, 100_000, 0);
        assert_eq!(check(&bomb, &l).unwrap_err().code(), ErrorCode::BadImage);
        let gif = b"GIF89a\x10\x00\x10\x00\x00\x00\x00".to_vec();
        assert_eq!(check(&gif, &l).unwrap_err().code(), ErrorCode::BadImage);
        assert_eq!(
            check(b"hello, not an image", &l).unwrap_err().code(),
            ErrorCode::BadImage
        );
        let big = samples::png(64, 64, 300 * 1024);
        assert_eq!(
            check(&big, &l).unwrap_err().code(),
            ErrorCode::ImageTooLarge
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = check(&bytes, &Limits::default());
        }

        #[test]
        fn corrupted_png_headers_never_panic(cut in 0usize..40, flip in 0usize..40, v in any::<u8>()) {
            let mut png = samples::png(10, 10, 8);
            if let Some(b) = png.get_mut(flip) { *b = v; }
            png.truncate(cut);
            let _ = check(&png, &Limits::default());
        }
    }
}
