//! `Encode` reproduces the image rows of `Pipeline::prepare` (the single-process
//! reference) for one, two and three images, and serves repeats from its cache.

#[allow(dead_code)]
mod common;

use candle_core::DType;
use common::{Worker, conversation, embeddings, image_cases, max_abs_diff, prepare};
use tessera_model::chat::{Message, Role};
use tessera_model::image_tokens::Tiling;
use tessera_proto::internal::v1::{Dtype, EncodeResponse};

const TOLERANCE: f32 = 1e-5;

/// Asserts every image of `response` against `prepare` of `messages`; returns the max diff.
fn assert_matches_reference(
    what: &str,
    dtype: DType,
    response: &EncodeResponse,
    messages: &[Message],
    names: &[String],
) -> f32 {
    let reference = prepare(dtype, messages, names);
    assert_eq!(
        response.images.len(),
        names.len(),
        "{what}: one entry per image"
    );
    let mut max = 0f32;
    for (i, ((image, info), run)) in response
        .images
        .iter()
        .zip(&reference.images)
        .zip(&reference.encoded.image_runs)
        .enumerate()
    {
        let tiling = Tiling::new(image.tiles_x as usize, image.tiles_y as usize);
        assert_eq!(tiling, info.tiling, "{what}: image {i} tiling");
        assert_eq!(
            image.num_tokens as usize, info.tokens,
            "{what}: image {i} tokens"
        );
        assert_eq!(run.len(), info.tokens, "{what}: image {i} run");
        assert_eq!((image.width, image.height), (info.width, info.height));
        let wire = image.embeddings.as_ref().unwrap();
        let want_dtype = if dtype == DType::BF16 {
            Dtype::Bf16
        } else {
            Dtype::F32
        };
        assert_eq!(wire.dtype, want_dtype as i32, "{what}: image {i} dtype");
        let want = reference.embeds.narrow(0, run.start, run.len()).unwrap();
        let diff = max_abs_diff(&embeddings(image), &want);
        assert!(diff <= TOLERANCE, "{what}: image {i} differs by {diff}");
        max = max.max(diff);
    }
    max
}

fn three_image_conversation() -> (Vec<Message>, Vec<String>) {
    let names: Vec<String> = ["img_640x480.png", "img_518x293.png", "img_384x384.png"]
        .map(String::from)
        .to_vec();
    let user = Message {
        role: Role::User,
        content: "<image>\n<image>\n<image>\nWhat do these have in common?".into(),
        images: names.clone(),
    };
    (vec![user, Message::new(Role::Assistant, "")], names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encode_equals_the_image_rows_of_prepare() {
    let worker = Worker::with_cache(0).await;
    let mut cases = image_cases();
    assert!(cases.iter().any(|c| c["num_images"] == 1));
    assert!(cases.iter().any(|c| c["num_images"] == 2));
    let mut seen = Vec::new();
    cases.retain(|c| {
        let new = !seen.contains(&c["conversation"]);
        seen.push(c["conversation"].clone());
        new
    });
    for case in &cases {
        let (messages, names) = conversation(case);
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let response = worker.encode(&refs).await;
        let what = case["name"].as_str().unwrap();
        let diff = assert_matches_reference(what, DType::F32, &response, &messages, &names);
        let spatial: Vec<[u32; 2]> = response
            .images
            .iter()
            .map(|i| [i.tiles_x, i.tiles_y])
            .collect();
        assert_eq!(
            serde_json::to_value(spatial).unwrap(),
            case["images_spatial_crop"],
            "{what}: the reference processor's tiling"
        );
        println!("{what}: max abs diff {diff:e} (tolerance {TOLERANCE:e})");
    }

    // More than two images: no cropping, every image is 1x1.
    let (messages, names) = three_image_conversation();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let response = worker.encode(&refs).await;
    assert!(
        response
            .images
            .iter()
            .all(|i| (i.tiles_x, i.tiles_y) == (1, 1))
    );
    let diff = assert_matches_reference("three images", DType::F32, &response, &messages, &names);
    println!("three images: max abs diff {diff:e} (tolerance {TOLERANCE:e})");
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_workers_answer_in_bf16_like_a_bf16_pipeline() {
    let mut cfg = tessera_vision_worker::Config::new(common::fixture());
    cfg.member.compute.dtype = Some(tessera_runtime::device::Precision::Bf16);
    let worker = Worker::start(cfg).await;
    let case = &image_cases()[0];
    let (messages, names) = conversation(case);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let response = worker.encode(&refs).await;
    let diff = assert_matches_reference("bf16", DType::BF16, &response, &messages, &names);
    println!("bf16 {}: max abs diff {diff:e}", case["name"]);
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_come_from_the_cache_and_only_new_images_reach_the_tower() {
    let worker = Worker::with_cache(64).await;
    let (a, b) = ("img_640x480.png", "img_518x293.png");

    let first = worker.encode(&[a]).await;
    let s = worker.service.stats();
    assert_eq!((s.cache.hits, s.cache.misses, s.tower_passes), (0, 1, 1));

    let again = worker.encode(&[a]).await;
    let s = worker.service.stats();
    assert_eq!((s.cache.hits, s.cache.misses, s.tower_passes), (1, 1, 1));
    assert_eq!(again, first, "a cached image is returned byte for byte");

    // Two images still crop: `a` is a hit, only `b` goes through the tower.
    let pair = worker.encode(&[a, b]).await;
    let s = worker.service.stats();
    assert_eq!((s.cache.hits, s.cache.misses), (2, 2));
    assert_eq!(
        (s.tower_passes, s.images_encoded, s.cache.entries),
        (2, 2, 2)
    );
    assert_eq!(pair.images[0], first.images[0]);
    assert_eq!(
        Tiling::new(2, 2).num_tokens(),
        first.images[0].num_tokens as usize
    );

    // Three images turn cropping off: the same bytes are a different entry.
    let (messages, names) = three_image_conversation();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let three = worker.encode(&refs).await;
    let s = worker.service.stats();
    assert_eq!((s.cache.hits, s.cache.misses), (2, 5));
    assert_eq!(
        (s.tower_passes, s.images_encoded, s.cache.entries),
        (3, 5, 5)
    );
    assert_eq!((three.images[0].tiles_x, three.images[0].tiles_y), (1, 1));
    assert_matches_reference(
        "three images, cached pair",
        DType::F32,
        &three,
        &messages,
        &names,
    );

    // Two of three cached: the new one is still tiled as one of three (no cropping).
    // The same PNG with trailing bytes decodes alike but hashes differently.
    let mut req = common::request(&refs);
    let mut renamed = req.images[0].data.to_vec();
    renamed.extend_from_slice(b"trailing bytes");
    req.images[0].data = renamed.into();
    let mixed = worker
        .client()
        .await
        .encode(req)
        .await
        .unwrap()
        .into_inner();
    let s = worker.service.stats();
    assert_eq!((s.cache.hits, s.cache.misses), (4, 6));
    assert_eq!((s.tower_passes, s.images_encoded), (4, 6));
    assert_eq!(
        mixed, three,
        "one of three images is never cropped, cached or not"
    );
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_cache_every_request_is_encoded_but_duplicates_only_once() {
    let worker = Worker::with_cache(0).await;
    let a = "img_384x384.png";
    let twice = worker.encode(&[a, a]).await;
    assert_eq!(twice.images[0], twice.images[1]);
    let s = worker.service.stats();
    assert_eq!(
        (s.tower_passes, s.images_encoded, s.cache.entries),
        (1, 1, 0)
    );
    let once = worker.encode(&[a]).await;
    let s = worker.service.stats();
    assert_eq!((s.cache.hits, s.tower_passes), (0, 2));
    assert_eq!(
        once.images[0], twice.images[0],
        "two images of 384x384 still crop alike"
    );
    worker.stop().await.unwrap();
}
