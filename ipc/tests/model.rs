//! Model-based test: the ring against a `VecDeque` over random push/pop sequences.

use std::collections::VecDeque;

use moltbot_ipc::{HeapRing, RingError};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Push(usize, u8),
    Pop,
}

fn ops(max_len: usize) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            3 => (0..=max_len, any::<u8>()).prop_map(|(l, b)| Op::Push(l, b)),
            2 => Just(Op::Pop),
        ],
        1..400,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn ring_behaves_like_a_fifo(cap_shift in 8u32..12, seq in ops(600)) {
        let cap = 1usize << cap_shift;
        let ring = HeapRing::new(cap).unwrap();
        let (mut p, mut c) = ring.split().unwrap();
        let mut model: VecDeque<Vec<u8>> = VecDeque::new();
        let max = cap - 16;
        for op in seq {
            match op {
                Op::Push(len, byte) => {
                    let data = vec![byte; len];
                    match p.push(&data) {
                        Ok(()) => model.push_back(data),
                        Err(RingError::TooLarge { .. }) => prop_assert!(len > max),
                        Err(RingError::Full) => {
                            prop_assert!(len <= max);
                            // Full is only possible when frames are queued or padding is
                            // pending: an empty ring takes any allowed frame after the
                            // consumer skipped the padding.
                            prop_assert!(!model.is_empty() || c.has_data().unwrap());
                        }
                        Err(e) => prop_assert!(false, "unexpected {e:?}"),
                    }
                }
                Op::Pop => {
                    let got = c.peek().unwrap().map(|f| {
                        let v = f.bytes().to_vec();
                        f.release();
                        v
                    });
                    prop_assert_eq!(got, model.pop_front());
                }
            }
        }
        // Drain: everything pushed comes out, in order, and nothing else.
        while let Some(f) = c.peek().unwrap() {
            let v = f.bytes().to_vec();
            f.release();
            prop_assert_eq!(Some(v), model.pop_front());
        }
        prop_assert!(model.is_empty());
        // After a full drain, a maximal frame always fits (possibly after skipping padding).
        match p.push(&vec![1; max]) {
            Ok(()) => {}
            Err(RingError::Full) => {
                prop_assert!(c.peek().unwrap().is_none());
                p.push(&vec![1; max]).unwrap();
            }
            Err(e) => prop_assert!(false, "unexpected {e:?}"),
        }
    }
}
