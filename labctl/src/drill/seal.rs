//! The sealed answer key: the drill's causes, encrypted under the drill's
//! token, so the key can be stored beside the lab without giving the
//! answers away to whoever can read the lab's files.
//!
//! ChaCha20-Poly1305 with a key derived from the token by HKDF-SHA256 (a
//! fresh salt per seal, so equal tokens never give equal keys) and a fresh
//! nonce. The authentication tag makes a wrong token or an edited file fail
//! loudly instead of decrypting to garbage.

use rand::Rng;
use ring::{
    aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    hkdf::{HKDF_SHA256, Salt},
    rand::{SecureRandom, SystemRandom},
};
use serde::{Deserialize, Serialize};

use super::DrillKey;

/// Format of the sealed document; a reader refuses any other.
const VERSION: u32 = 1;
const SALT_LEN: usize = 16;
/// HKDF's info: a key derived for this purpose is useless for any other.
const INFO: &[u8] = b"grpc-incident-lab labctl drill key v1";
/// Authenticated with the ciphertext, so the version cannot be swapped.
const AAD: &[u8] = b"labctl drill key v1";
/// The plaintext is padded with spaces to a multiple of this: the values'
/// names differ in length (`l4`/`etcd`, `close`/`leak-on-error`), so an
/// unpadded ciphertext's length would hint at the causes.
const PAD_TO: usize = 256;

/// What the key file holds. Only the ciphertext depends on the causes.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sealed {
    version: u32,
    salt: String,
    nonce: String,
    ciphertext: String,
}

/// Why a drill key could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the drill token is empty")]
    EmptyToken,
    #[error("the system's random number generator failed")]
    Random,
    /// Cannot happen for a drill key's size; kept rather than a panic.
    #[error("the cipher refused the drill key")]
    Cipher,
    #[error("the drill key could not be encoded: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("not a sealed drill key: {0}")]
    Malformed(String),
    #[error(
        "sealed drill key version {found} is not supported; this labctl reads version {VERSION}"
    )]
    UnsupportedVersion { found: u32 },
    #[error(
        "the token does not open the drill key: it is not the token the drill was started with, or the sealed key was altered"
    )]
    WrongToken,
}

/// A fresh drill token: 32 hex digits (128 bits) from the thread's CSPRNG.
pub fn new_token() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    to_hex(&bytes)
}

/// Encrypts `key` under `token` into a small JSON document. Surrounding
/// whitespace of the token is ignored (it is often read from a file).
pub fn seal(key: &DrillKey, token: &str) -> Result<String, SealError> {
    let random = SystemRandom::new();
    let mut salt = [0u8; SALT_LEN];
    random.fill(&mut salt).map_err(|_| SealError::Random)?;
    let mut nonce = [0u8; NONCE_LEN];
    random.fill(&mut nonce).map_err(|_| SealError::Random)?;

    let mut in_out = serde_json::to_vec(key).map_err(SealError::Encode)?;
    // JSON allows trailing whitespace, so the padding needs no unpadding.
    in_out.resize(in_out.len().div_ceil(PAD_TO) * PAD_TO, b' ');
    derive_key(token, &salt)?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(AAD),
            &mut in_out,
        )
        .map_err(|_| SealError::Cipher)?;
    let sealed = Sealed {
        version: VERSION,
        salt: to_hex(&salt),
        nonce: to_hex(&nonce),
        ciphertext: to_hex(&in_out),
    };
    serde_json::to_string(&sealed).map_err(SealError::Encode)
}

/// Decrypts a document made by [`seal`] with the same token.
pub fn open(sealed: &str, token: &str) -> Result<DrillKey, SealError> {
    let sealed: Sealed =
        serde_json::from_str(sealed).map_err(|e| SealError::Malformed(e.to_string()))?;
    if sealed.version != VERSION {
        return Err(SealError::UnsupportedVersion {
            found: sealed.version,
        });
    }
    let salt = from_hex_field("salt", &sealed.salt)?;
    let nonce: [u8; NONCE_LEN] = from_hex_field("nonce", &sealed.nonce)?
        .try_into()
        .map_err(|_| SealError::Malformed(format!("the nonce is not {NONCE_LEN} bytes")))?;
    let mut in_out = from_hex_field("ciphertext", &sealed.ciphertext)?;
    let plain = derive_key(token, &salt)?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(AAD),
            &mut in_out,
        )
        .map_err(|_| SealError::WrongToken)?;
    serde_json::from_slice(plain)
        .map_err(|e| SealError::Malformed(format!("it opened, but holds no drill key: {e}")))
}

fn derive_key(token: &str, salt: &[u8]) -> Result<LessSafeKey, SealError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(SealError::EmptyToken);
    }
    let prk = Salt::new(HKDF_SHA256, salt).extract(token.as_bytes());
    let okm = prk
        .expand(&[INFO], &CHACHA20_POLY1305)
        // Only fails for an output longer than 255 hashes; 32 bytes is not.
        .map_err(|_| SealError::Cipher)?;
    Ok(LessSafeKey::new(UnboundKey::from(okm)))
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

pub(super) fn from_hex(text: &str) -> Option<Vec<u8>> {
    let digits = text.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks_exact(2)
        .map(|pair| {
            let high = char::from(pair[0]).to_digit(16)?;
            let low = char::from(pair[1]).to_digit(16)?;
            u8::try_from(high << 4 | low).ok()
        })
        .collect()
}

fn from_hex_field(name: &str, text: &str) -> Result<Vec<u8>, SealError> {
    from_hex(text).ok_or_else(|| SealError::Malformed(format!("the {name} is not hex")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drill::{CauseCount, draw};
    use lab_common::faults::Switch;

    fn key() -> DrillKey {
        DrillKey {
            seed: 42,
            causes: "3".into(),
            faults: draw(42, CauseCount::Exactly(3)),
            started_at_unix_ms: 1_700_000_000_123,
        }
    }

    #[test]
    fn a_sealed_key_opens_with_its_token() {
        let token = new_token();
        let sealed = seal(&key(), &token).unwrap();
        assert_eq!(open(&sealed, &token).unwrap(), key());
        // A trailing newline from a token file does not matter.
        assert_eq!(open(&sealed, &format!("{token}\n")).unwrap(), key());
    }

    #[test]
    fn sealing_twice_gives_different_documents() {
        let token = new_token();
        assert_ne!(seal(&key(), &token).unwrap(), seal(&key(), &token).unwrap());
    }

    #[test]
    fn the_wrong_token_does_not_open_it() {
        let sealed = seal(&key(), &new_token()).unwrap();
        let err = open(&sealed, &new_token()).unwrap_err();
        assert!(matches!(err, SealError::WrongToken), "{err:?}");
        assert!(
            err.to_string()
                .contains("the token does not open the drill key"),
            "{err}"
        );
    }

    #[test]
    fn a_tampered_byte_does_not_open() {
        let token = new_token();
        let sealed = seal(&key(), &token).unwrap();
        let mut doc: serde_json::Value = serde_json::from_str(&sealed).unwrap();
        for field in ["ciphertext", "nonce", "salt"] {
            let mut bytes = from_hex(doc[field].as_str().unwrap()).unwrap();
            bytes[0] ^= 0x01;
            let mut tampered = doc.clone();
            tampered[field] = serde_json::Value::from(to_hex(&bytes));
            let err = open(&tampered.to_string(), &token).unwrap_err();
            assert!(matches!(err, SealError::WrongToken), "{field}: {err:?}");
        }
        doc["version"] = serde_json::Value::from(2);
        assert!(matches!(
            open(&doc.to_string(), &token),
            Err(SealError::UnsupportedVersion { found: 2 })
        ));
        assert!(matches!(
            open("{\"version\":1}", &token),
            Err(SealError::Malformed(_))
        ));
    }

    #[test]
    fn the_sealed_text_gives_nothing_away() {
        let key = key();
        let sealed = seal(&key, &new_token()).unwrap();
        // The document holds only what opening it needs: no field carries
        // the key in the clear.
        let document: serde_json::Value = serde_json::from_str(&sealed).unwrap();
        let mut fields: Vec<&str> = document
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        fields.sort_unstable();
        assert_eq!(fields, ["ciphertext", "nonce", "salt", "version"]);
        // And the ciphertext's bytes are not the plaintext's: no piece of
        // the key's JSON survives in them (hex hides nothing by itself, so
        // the bytes are compared, not the text).
        let plaintext = serde_json::to_vec(&key).unwrap();
        let ciphertext = from_hex(document["ciphertext"].as_str().unwrap()).unwrap();
        let mut words: Vec<&str> = Switch::ALL
            .into_iter()
            .map(|s| s.value_in(&key.faults))
            .collect();
        words.extend(["faults", "seed", "causes"]);
        for word in words {
            assert!(
                plaintext.windows(word.len()).any(|w| w == word.as_bytes()),
                "`{word}` is in the plaintext, or this check means nothing"
            );
            assert!(
                !ciphertext.windows(word.len()).any(|w| w == word.as_bytes()),
                "`{word}` in the ciphertext"
            );
        }
        assert!(
            !ciphertext
                .windows(16)
                .any(|w| plaintext.windows(16).any(|p| p == w)),
            "16 plaintext bytes in a row survive in the ciphertext"
        );
    }

    #[test]
    fn the_sealed_length_does_not_depend_on_the_causes() {
        let token = new_token();
        let lengths: Vec<usize> = [
            (CauseCount::All, 1),
            (CauseCount::Exactly(0), 23_456_789_012),
            (CauseCount::Random, u64::MAX),
        ]
        .into_iter()
        .map(|(count, seed)| {
            let key = DrillKey {
                seed,
                causes: count.to_string(),
                faults: draw(seed, count),
                started_at_unix_ms: 1_700_000_000_000 + seed % 1000,
            };
            seal(&key, &token).unwrap().len()
        })
        .collect();
        assert!(lengths.windows(2).all(|w| w[0] == w[1]), "{lengths:?}");
    }

    #[test]
    fn an_empty_token_is_refused() {
        assert!(matches!(seal(&key(), " \n"), Err(SealError::EmptyToken)));
    }

    #[test]
    fn tokens_are_32_hex_digits_and_differ() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 32);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
    }

    #[test]
    fn hex_round_trips_and_refuses_non_hex() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&bytes)), Some(bytes));
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex("+1"), None);
    }
}
