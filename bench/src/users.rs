//! Drawing the user of each request: uniform or Zipf over `user-0` .. `user-{n-1}`.

use rand::Rng;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand_distr::{Distribution, Zipf};

use crate::BenchError;
use crate::config::Dist;

/// Draws user indices in `0..n`. Cheap to share: sampling takes the caller's generator.
#[derive(Debug, Clone)]
pub struct UserPicker {
    n: u32,
    zipf: Option<Zipf<f64>>,
}

impl UserPicker {
    /// `n` users (≥ 1); with [`Dist::Zipf`] user `k` (0-based) has probability ∝ 1/(k+1)^s
    /// (rejection-inversion sampling, O(1) per draw, no table).
    pub fn new(n: u32, dist: Dist, s: f64) -> Result<UserPicker, BenchError> {
        if n == 0 {
            return Err(BenchError::Config("users must be at least 1".into()));
        }
        let zipf = match dist {
            Dist::Uniform => None,
            Dist::Zipf => Some(
                Zipf::new(f64::from(n), s)
                    .map_err(|e| BenchError::Config(format!("zipf(n={n}, s={s}): {e}")))?,
            ),
        };
        Ok(UserPicker { n, zipf })
    }

    /// The number of users.
    pub fn users(&self) -> u32 {
        self.n
    }

    /// One draw.
    pub fn pick<R: Rng + ?Sized>(&self, rng: &mut R) -> u32 {
        match &self.zipf {
            None => rng.random_range(0..self.n),
            // The sample is an integer-valued float in [1, n].
            Some(z) => {
                let k = z.sample(rng) as u64;
                (k.clamp(1, u64::from(self.n)) - 1) as u32
            }
        }
    }
}

/// The generator of load thread `thread` for a run seeded with `seed`: distinct, reproducible
/// streams per thread.
pub fn thread_rng(seed: u64, thread: usize) -> SmallRng {
    SmallRng::seed_from_u64(seed ^ (thread as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Appends `user-{index}` (the user id of index `index`).
pub fn write_user(out: &mut Vec<u8>, index: u32) {
    out.extend_from_slice(b"user-");
    write_u64(out, u64::from(index));
}

/// Appends a decimal number without going through `fmt`.
pub fn write_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(p: &UserPicker, draws: usize, seed: u64) -> Vec<u64> {
        let mut rng = thread_rng(seed, 0);
        let mut h = vec![0u64; p.users() as usize];
        for _ in 0..draws {
            h[p.pick(&mut rng) as usize] += 1;
        }
        h
    }

    #[test]
    fn zipf_follows_the_power_law() {
        let n = 100u32;
        let p = UserPicker::new(n, Dist::Zipf, 1.0).expect("picker");
        let draws = 200_000;
        let h = histogram(&p, draws, 7);
        let harmonic: f64 = (1..=n).map(|k| 1.0 / f64::from(k)).sum();
        for k in [1u32, 2, 5, 10, 50] {
            let expected = 1.0 / (f64::from(k) * harmonic);
            let got = h[(k - 1) as usize] as f64 / draws as f64;
            let rel = (got - expected).abs() / expected;
            assert!(rel < 0.1, "rank {k}: got {got:.5}, expected {expected:.5}");
        }
        // Heavier head than uniform: the top user alone takes ~19% of the traffic.
        assert!(h[0] > h[99] * 50);
    }

    #[test]
    fn zipf_exponent_changes_the_skew() {
        let steep = UserPicker::new(1000, Dist::Zipf, 2.0).expect("picker");
        let h = histogram(&steep, 50_000, 3);
        let expected: f64 = 1.0 / (1..=1000).map(|k| 1.0 / (k as f64).powi(2)).sum::<f64>();
        let got = h[0] as f64 / 50_000.0;
        assert!(
            (got - expected).abs() < 0.02,
            "got {got}, expected {expected}"
        );
    }

    #[test]
    fn uniform_covers_all_users_evenly() {
        let p = UserPicker::new(10, Dist::Uniform, 1.0).expect("picker");
        let h = histogram(&p, 100_000, 1);
        for (k, &c) in h.iter().enumerate() {
            assert!((9_000..11_000).contains(&c), "user {k}: {c}");
        }
    }

    #[test]
    fn draws_are_deterministic_per_seed_and_thread() {
        let p = UserPicker::new(1000, Dist::Zipf, 1.1).expect("picker");
        let draw = |seed, thread| {
            let mut rng = thread_rng(seed, thread);
            (0..64).map(|_| p.pick(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42, 0), draw(42, 0));
        assert_ne!(draw(42, 0), draw(42, 1));
        assert_ne!(draw(42, 0), draw(43, 0));
    }

    #[test]
    fn single_user_and_range() {
        let mut rng = thread_rng(1, 0);
        for dist in [Dist::Uniform, Dist::Zipf] {
            let one = UserPicker::new(1, dist, 1.0).expect("picker");
            assert!((0..100).all(|_| one.pick(&mut rng) == 0));
            let many = UserPicker::new(5, dist, 0.0).expect("picker");
            assert!((0..1000).all(|_| many.pick(&mut rng) < 5));
        }
        assert!(UserPicker::new(0, Dist::Uniform, 1.0).is_err());
        assert!(UserPicker::new(3, Dist::Zipf, -1.0).is_err());
    }

    #[test]
    fn writes_user_ids_and_numbers() {
        let mut out = Vec::new();
        write_user(&mut out, 0);
        out.push(b' ');
        write_user(&mut out, 4_294_967_295);
        out.push(b' ');
        write_u64(&mut out, u64::MAX);
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            "user-0 user-4294967295 18446744073709551615"
        );
    }
}
