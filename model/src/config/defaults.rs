//! The reference classes' defaults, one function each for serde.

pub(super) fn d_1() -> usize {
    1
}
pub(super) fn d_2() -> usize {
    2
}
pub(super) fn d_14() -> usize {
    14
}
pub(super) fn d_16() -> usize {
    16
}
pub(super) fn d_24() -> usize {
    24
}
pub(super) fn d_30() -> usize {
    30
}
pub(super) fn d_32() -> usize {
    32
}
pub(super) fn d_32o() -> Option<usize> {
    Some(32)
}
pub(super) fn d_384() -> usize {
    384
}
pub(super) fn d_512o() -> Option<usize> {
    Some(512)
}
pub(super) fn d_64o() -> Option<usize> {
    Some(64)
}
pub(super) fn d_128o() -> Option<usize> {
    Some(128)
}
pub(super) fn d_1024() -> usize {
    1024
}
pub(super) fn d_1152() -> usize {
    1152
}
pub(super) fn d_1407() -> usize {
    1407
}
pub(super) fn d_2048() -> usize {
    2048
}
pub(super) fn d_4096() -> usize {
    4096
}
pub(super) fn d_11008() -> usize {
    11008
}
pub(super) fn d_vocab() -> usize {
    102400
}
pub(super) fn d_bos() -> u32 {
    100000
}
pub(super) fn d_eos() -> u32 {
    100001
}
pub(super) fn d_q_lora() -> Option<usize> {
    Some(1536)
}
pub(super) fn d_1f() -> f64 {
    1.0
}
pub(super) fn d_4f() -> f64 {
    4.0
}
pub(super) fn d_eps() -> f64 {
    1e-6
}
pub(super) fn d_theta() -> f64 {
    10000.0
}
pub(super) fn d_true() -> bool {
    true
}
pub(super) fn d_half3() -> [f64; 3] {
    [0.5; 3]
}
pub(super) fn d_topk_method() -> String {
    "gready".into()
}
pub(super) fn d_scoring_func() -> String {
    "softmax".into()
}
pub(super) fn d_silu() -> String {
    "silu".into()
}
pub(super) fn d_tile_tag() -> String {
    "tile_tag".into()
}
pub(super) fn d_global_view_pos() -> String {
    "head".into()
}
pub(super) fn d_vision_model_name() -> String {
    "siglip_large_patch16_384".into()
}
pub(super) fn d_projector_type() -> String {
    "downsample_mlp_gelu".into()
}
pub(super) fn d_image_token() -> String {
    "<image>".into()
}
pub(super) fn d_pad_token() -> String {
    "<｜▁pad▁｜>".into()
}
pub(super) fn d_sft_format() -> String {
    "deepseek".into()
}
pub(super) fn d_ignore_id() -> i64 {
    -100
}
/// `DeepseekVLV2Config`'s default: a single 384×384 candidate.
pub(super) fn d_one_candidate() -> Vec<[usize; 2]> {
    vec![[384, 384]]
}
pub(super) fn d_empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}
/// The 23 released candidate resolutions: every (m·384, n·384) with m·n ≤ 9, in the
/// released order.
pub(super) fn d_candidates() -> Vec<[usize; 2]> {
    [
        [1, 1],
        [1, 2],
        [2, 1],
        [1, 3],
        [3, 1],
        [1, 4],
        [4, 1],
        [2, 2],
        [1, 5],
        [5, 1],
        [1, 6],
        [6, 1],
        [2, 3],
        [3, 2],
        [1, 7],
        [7, 1],
        [1, 8],
        [8, 1],
        [2, 4],
        [4, 2],
        [1, 9],
        [9, 1],
        [3, 3],
    ]
    .into_iter()
    .map(|[w, h]| [w * 384, h * 384])
    .collect()
}
