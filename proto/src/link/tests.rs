use super::*;
use proptest::prelude::*;

fn key(b: u8) -> ClusterKey {
    ClusterKey::from_bytes([b; CLUSTER_KEY_BYTES])
}

/// A finished handshake between two ends holding `dialer_key` and
/// `listener_key`: (dialer's keys, listener's keys), or the listener's error.
fn handshake(
    dialer_key: &ClusterKey,
    listener_key: &ClusterKey,
) -> Result<(LinkKeys, LinkKeys), LinkError> {
    let (dialer, hello) = Dialer::new(dialer_key, [1; 32]);
    let (answer, listener) = accept(listener_key, [2; 32], &hello)?;
    Ok((dialer.finish(&answer)?, listener))
}

/// Every record in `stream`, opened; panics on an error.
fn open_all(opener: &mut Opener, stream: &mut [u8]) -> Vec<u8> {
    let mut plain = Vec::new();
    let mut at = 0;
    while let Some(o) = opener.open_in_place(&mut stream[at..]).unwrap() {
        plain.extend_from_slice(&stream[at + o.plain.start..at + o.plain.end]);
        at += o.consumed;
    }
    assert_eq!(at, stream.len(), "a partial record was left");
    plain
}

#[test]
fn both_directions_carry_data() {
    let (mut d, mut l) = handshake(&key(7), &key(7)).unwrap();
    let mut wire = Vec::new();
    d.sealer.seal(b"hello listener", &mut wire).unwrap();
    assert_eq!(open_all(&mut l.opener, &mut wire), b"hello listener");
    let mut back = Vec::new();
    l.sealer.seal(b"hello dialer", &mut back).unwrap();
    assert_eq!(open_all(&mut d.opener, &mut back), b"hello dialer");
}

#[test]
fn a_wrong_key_fails_the_handshake_and_an_answer_for_another_dialer_too() {
    let (_, hello) = Dialer::new(&key(1), [1; 32]);
    assert_eq!(
        accept(&key(2), [2; 32], &hello).err(),
        Some(LinkError::Handshake)
    );
    // An answer is bound to the dialer's own ephemeral key.
    let (dialer, hello) = Dialer::new(&key(1), [1; 32]);
    let (answer, _) = accept(&key(1), [2; 32], &hello).unwrap();
    let (other, _) = Dialer::new(&key(1), [9; 32]);
    assert_eq!(other.finish(&answer).err(), Some(LinkError::Handshake));
    assert!(dialer.finish(&answer).is_ok());
}

#[test]
fn a_hello_of_another_length_is_refused() {
    let (_, hello) = Dialer::new(&key(1), [1; 32]);
    for len in [0, 1, HELLO_BYTES - 1] {
        assert_eq!(
            accept(&key(1), [2; 32], &hello[..len]).err(),
            Some(LinkError::Handshake)
        );
    }
    let mut long = hello.to_vec();
    long.push(0);
    assert_eq!(
        accept(&key(1), [2; 32], &long).err(),
        Some(LinkError::Handshake)
    );
}

#[test]
fn large_writes_split_into_records_and_empty_ones_are_allowed() {
    let (mut d, mut l) = handshake(&key(3), &key(3)).unwrap();
    let big: Vec<u8> = (0..3 * RECORD_PLAINTEXT_BYTES_MAX + 5)
        .map(|i| i as u8)
        .collect();
    let mut wire = Vec::new();
    d.sealer.seal(&big, &mut wire).unwrap();
    d.sealer.seal(&[], &mut wire).unwrap();
    assert_eq!(d.sealer.records(), 5);
    assert_eq!(open_all(&mut l.opener, &mut wire), big);
    assert_eq!(l.opener.records(), 5);
}

#[test]
fn a_flipped_byte_a_replayed_or_a_dropped_record_ends_the_link() {
    let (mut d, l) = handshake(&key(4), &key(4)).unwrap();
    let mut one = Vec::new();
    d.sealer.seal(b"first", &mut one).unwrap();
    let mut two = Vec::new();
    d.sealer.seal(b"second", &mut two).unwrap();
    for at in 0..one.len() {
        let (mut d2, mut l2) = handshake(&key(4), &key(4)).unwrap();
        let mut wire = Vec::new();
        d2.sealer.seal(b"first", &mut wire).unwrap();
        wire[at] ^= 0x20;
        let opened = l2.opener.open_in_place(&mut wire);
        assert!(
            !matches!(opened, Ok(Some(_))),
            "flipped byte {at} was accepted"
        );
    }
    // Records must arrive in order, each once.
    let mut opener = l.opener;
    assert_eq!(
        opener.open_in_place(&mut two.clone()).err(),
        Some(LinkError::BadRecord)
    );
    let mut fresh = handshake(&key(4), &key(4)).unwrap();
    let mut wire = Vec::new();
    fresh.0.sealer.seal(b"x", &mut wire).unwrap();
    let replay = wire.clone();
    assert!(fresh.1.opener.open_in_place(&mut wire).unwrap().is_some());
    assert_eq!(
        fresh.1.opener.open_in_place(&mut replay.clone()).err(),
        Some(LinkError::BadRecord)
    );
}

#[test]
fn a_record_shorter_than_its_tag_is_invalid_and_a_partial_one_incomplete() {
    let (mut d, mut l) = handshake(&key(5), &key(5)).unwrap();
    assert_eq!(
        l.opener.open_in_place(&mut [0, 15]).err(),
        Some(LinkError::ShortRecord(15))
    );
    let mut wire = Vec::new();
    d.sealer.seal(b"abc", &mut wire).unwrap();
    for len in 0..wire.len() {
        assert_eq!(
            l.opener.open_in_place(&mut wire.clone()[..len]),
            Ok(None),
            "{len}"
        );
    }
    assert!(l.opener.open_in_place(&mut wire).unwrap().is_some());
}

#[test]
fn a_key_file_is_hex() {
    let k = key(0xab);
    assert_eq!(ClusterKey::from_hex(&format!("  {}\n", k.to_hex())), Ok(k));
    assert_eq!(ClusterKey::from_hex("ab"), Err(LinkError::KeyFormat));
    assert_eq!(
        ClusterKey::from_hex(&"zz".repeat(32)),
        Err(LinkError::KeyFormat)
    );
    assert_eq!(
        ClusterKey::from_hex(&"é".repeat(32)),
        Err(LinkError::KeyFormat)
    );
    assert_eq!(format!("{:?}", key(1)), "ClusterKey(..)");
}

proptest! {
    /// Arbitrary bytes are never accepted as a record and never panic.
    #[test]
    fn arbitrary_bytes_are_never_opened(mut bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let (_, mut l) = handshake(&key(6), &key(6)).unwrap();
        prop_assert!(!matches!(l.opener.open_in_place(&mut bytes), Ok(Some(_))));
    }

    /// Arbitrary hellos never panic and are never accepted.
    #[test]
    fn arbitrary_hellos_are_refused(hello in proptest::collection::vec(any::<u8>(), 0..100)) {
        prop_assert!(accept(&key(6), [2; 32], &hello).is_err());
    }

    /// What is sealed in any pieces opens to the same bytes.
    #[test]
    fn sealed_pieces_open_to_the_same_stream(pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..2000), 0..8)) {
        let (mut d, mut l) = handshake(&key(8), &key(8)).unwrap();
        let mut wire = Vec::new();
        for p in &pieces {
            d.sealer.seal(p, &mut wire).unwrap();
        }
        prop_assert_eq!(open_all(&mut l.opener, &mut wire), pieces.concat());
    }
}
