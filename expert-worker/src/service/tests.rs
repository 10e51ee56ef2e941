use super::*;

fn request(rows: Vec<u32>, experts: Vec<u32>, weights: Vec<f32>) -> ForwardRequest {
    ForwardRequest {
        model_fingerprint: "fp".into(),
        layer: 1,
        rows: None,
        route_rows: rows,
        route_experts: experts,
        route_weights: weights,
    }
}

fn held() -> BTreeSet<(usize, usize)> {
    [(1, 0), (1, 1)].into_iter().collect()
}

#[test]
fn routes_are_zipped_from_the_parallel_lists() {
    let got = routes(
        &request(vec![0, 2], vec![1, 0], vec![0.5, 0.25]),
        "fp",
        &held(),
    )
    .unwrap();
    assert_eq!(
        got,
        vec![
            ExpertRoute {
                row: 0,
                expert: 1,
                weight: 0.5
            },
            ExpertRoute {
                row: 2,
                expert: 0,
                weight: 0.25
            },
        ]
    );
}

#[test]
fn unequal_route_lists_are_malformed() {
    let err = routes(&request(vec![0, 1], vec![1], vec![0.5, 0.5]), "fp", &held()).unwrap_err();
    assert!(matches!(err, Error::Malformed(_)), "{err}");
}

#[test]
fn an_expert_not_held_is_refused() {
    let err = routes(&request(vec![0], vec![5], vec![1.0]), "fp", &held()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotHeld {
                layer: 1,
                expert: 5
            }
        ),
        "{err}"
    );
}

#[test]
fn another_models_fingerprint_is_refused() {
    let err = routes(&request(vec![0], vec![0], vec![1.0]), "other", &held()).unwrap_err();
    assert!(matches!(err, Error::FingerprintMismatch { .. }), "{err}");
}
