//! Requests the worker refuses, with the code and message a caller can act on,
//! and the worker keeps serving afterwards.

#[allow(dead_code)]
mod common;

use common::{Worker, fixture, request};
use tessera_proto::internal::v1::{EncodeRequest, ImageInput};
use tessera_vision_worker::Config;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_image_is_invalid_argument_and_the_next_request_works() {
    let worker = Worker::with_cache(64).await;
    let mut client = worker.client().await;

    let mut bad = request(&["img_384x384.png"]);
    bad.images.push(ImageInput {
        data: b"definitely not an image".to_vec().into(),
        mime_type: String::new(),
    });
    let status = client.encode(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("image 1: invalid image: "),
        "{}",
        status.message()
    );

    let empty = EncodeRequest::default();
    let status = client.encode(empty).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("no images"),
        "{}",
        status.message()
    );

    let mut text = request(&["img_384x384.png"]);
    text.images[0].mime_type = "text/plain".into();
    let status = client.encode(text).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("image 0: "),
        "{}",
        status.message()
    );

    let good = client
        .encode(request(&["img_384x384.png"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(good.images.len(), 1);
    assert_eq!(good.images[0].num_tokens, 421);
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_over_the_pixel_limit_are_refused_by_index() {
    let worker = Worker::start(Config {
        max_image_pixels: 200_000,
        ..Config::new(fixture())
    })
    .await;
    let mut client = worker.client().await;
    // 384x384 = 147456 pixels passes; 640x480 = 307200 does not.
    let status = client
        .encode(request(&["img_384x384.png", "img_640x480.png"]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("image 1: "),
        "{}",
        status.message()
    );
    assert!(status.message().contains("200000"), "{}", status.message());
    let ok = client.encode(request(&["img_384x384.png"])).await;
    assert!(ok.is_ok(), "{ok:?}");
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_models_fingerprint_is_failed_precondition() {
    let worker = Worker::with_cache(64).await;
    let ours = tessera_model::fingerprint(&fixture()).unwrap();
    assert_eq!(worker.service.fingerprint(), Some(ours.as_str()));
    let mut client = worker.client().await;

    let mut wrong = request(&["img_384x384.png"]);
    wrong.model_fingerprint = "0123456789abcdef".into();
    let status = client.encode(wrong).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains(&ours), "{}", status.message());

    let mut right = request(&["img_384x384.png"]);
    right.model_fingerprint = ours;
    assert!(client.encode(right).await.is_ok());
    assert_eq!(
        worker.service.stats().tower_passes,
        1,
        "the refused request did no work"
    );
    worker.stop().await.unwrap();
}
