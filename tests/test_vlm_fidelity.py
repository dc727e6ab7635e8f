"""Fidelity of the vision-language methods to their official code (issue 15).

Each test ports the relevant part of the official repository, written here from reading it (not
copied), and compares it with oodscope on small inputs:

- GL-MCM local features: AtsuMiyai/GL-MCM ``clip/model.py`` (``ResidualAttentionBlock.forward``,
  ``VisionTransformer.forward``) on a tiny randomly initialised transformers ``CLIPModel``;
- GL-MCM's λ presets: AtsuMiyai/GL-MCM ``scripts/eval_imagenet.sh`` / ``eval_coco_*.sh`` / ``eval_voc_*.sh``;
- NegLabel/AdaNeg corpus, prompts and per-part-of-speech selection: XueJiang16/NegLabel
  ``mmcls/models/classifiers/multi_modal.py`` and YBZh/OpenOOD-VLM ``openood/networks/clip_fixed_ood_prompt.py``;
- AdaNeg's scores: YBZh/OpenOOD-VLM ``openood/postprocessors/ttaprompt_postprocessor.py``
  (``TTAPromptPostprocessor_noadagap``, the class ``scripts/ood/adaneg/imagenet.sh`` runs);
- the test-time-adaptive protocol: OpenOOD-VLM ``openood/evaluators/fsood_evaluator_clip.py``.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")


# =============================================================================== GL-MCM local features
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-clip-fidelity")
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(3)
    model = transformers.CLIPModel(config)
    with torch.no_grad():  # random, not-too-small layer-norm and bias parameters exercise every term
        for name, p in model.vision_model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


class _OfficialBlock(torch.nn.Module):
    """GL-MCM's ``ResidualAttentionBlock`` (OpenAI CLIP layout): returns the ordinary output x and the
    value-path output v (``out_proj`` applied to the value projection, + x, + MLP)."""

    def __init__(self, width: int, heads: int, act) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(width, heads)
        self.ln_1 = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(OrderedDict([("c_fc", torch.nn.Linear(width, 2 * width)), ("gelu", act),
                                                    ("c_proj", torch.nn.Linear(2 * width, width))]))
        self.ln_2 = torch.nn.LayerNorm(width)

    def forward(self, x):  # x: (L, N, D), as in the official code
        y = self.ln_1(x).permute(1, 0, 2)
        y = torch.nn.functional.linear(y, self.attn.in_proj_weight, self.attn.in_proj_bias)
        n, length, c = y.shape
        y = y.view(n, length, 3, c // 3).permute(2, 0, 1, 3).reshape(3 * n, length, c // 3)
        y = torch.nn.functional.linear(y, self.attn.out_proj.weight, self.attn.out_proj.bias)
        _, _, v = y.tensor_split(3, dim=0)
        v = v.permute(1, 0, 2)
        v = v + x
        v = v + self.mlp(self.ln_2(v))
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.ln_2(x))
        return x, v


def _official_glmcm_forward(hf_model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``VisionTransformer.forward`` of AtsuMiyai/GL-MCM, with the weights of a transformers CLIPModel
    moved into the OpenAI layout. Returns (global embedding, local features (N, P, D))."""
    vm, cfg = hf_model.vision_model, hf_model.config.vision_config
    width, heads = cfg.hidden_size, cfg.num_attention_heads

    class QuickGELU(torch.nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(1.702 * x)

    act = QuickGELU() if cfg.hidden_act == "quick_gelu" else torch.nn.GELU()
    blocks = []
    for layer in vm.encoder.layers:
        b = _OfficialBlock(width, heads, act)
        a = layer.self_attn
        with torch.no_grad():
            b.attn.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            b.attn.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            b.attn.out_proj.weight.copy_(a.out_proj.weight)
            b.attn.out_proj.bias.copy_(a.out_proj.bias)
            b.ln_1.load_state_dict(layer.layer_norm1.state_dict())
            b.ln_2.load_state_dict(layer.layer_norm2.state_dict())
            b.mlp.c_fc.load_state_dict(layer.mlp.fc1.state_dict())
            b.mlp.c_proj.load_state_dict(layer.mlp.fc2.state_dict())
        blocks.append(b.eval())
    emb = vm.embeddings
    x = emb.patch_embedding(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = emb.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1) + emb.position_embedding.weight
    x = vm.pre_layrnorm(x).permute(1, 0, 2)
    for b in blocks:  # the official Transformer returns the v of its last block
        x, v = b(x)
    x, v = x.permute(1, 0, 2), v.permute(1, 0, 2)
    v = vm.post_layernorm(v)[:, 1:]
    proj = hf_model.visual_projection.weight.T
    return vm.post_layernorm(x[:, 0, :]) @ proj, v @ proj


def test_dense_patches_match_the_official_glmcm_forward(tiny_clip) -> None:
    from oodscope.backbones import create

    backbone = create(f"hf:{tiny_clip}", device="cpu", patches=True)
    assert backbone.patch_kind == "dense" and "?" not in backbone.id
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    features = backbone.encode_images(images)
    with torch.no_grad():
        official_global, official_local = _official_glmcm_forward(backbone.model, images)
    assert features.patches.shape == (3, 16, 16)
    np.testing.assert_allclose(features.patches, official_local.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(features.embedding,
                               torch.nn.functional.normalize(official_global, dim=-1).numpy(), rtol=0, atol=1e-5)
    # The ordinary projected tokens are a different thing (what oodscope used before): kept as an option.
    tokens = create(f"hf:{tiny_clip}", device="cpu", patches="tokens")
    assert tokens.id == backbone.id + "?patches=tokens"
    old = tokens.encode_images(images).patches
    assert old.shape == features.patches.shape and not np.allclose(old, features.patches, atol=1e-3)
    with torch.no_grad():
        vision = tokens.model.vision_model
        out = vision(pixel_values=images)
        expected = tokens.model.visual_projection(vision.post_layernorm(out.last_hidden_state[:, 1:]))
    np.testing.assert_allclose(old, expected.numpy(), rtol=0, atol=1e-5)


def test_patch_kind_is_part_of_the_feature_cache_key(tiny_clip) -> None:
    from oodscope.backbones import create
    from oodscope.features.extract import backbone_config

    keys = {kind: backbone_config(create(f"hf:{tiny_clip}", device="cpu", patches=kind))
            for kind in (False, True, "dense", "tokens")}
    assert keys[True] == keys["dense"]
    assert len({repr(sorted(k.items())) for k in keys.values()}) == 3
    with pytest.raises(ValueError, match="patches"):
        create(f"hf:{tiny_clip}", device="cpu", patches="cls")


class _FixedTexts:
    """A text encoder with given unit vectors per text (unknown texts: hash-seeded random vectors)."""

    def __init__(self, dim: int, table: dict[str, np.ndarray] | None = None) -> None:
        self.dim, self.table, self.seen = dim, dict(table or {}), []

    def encode_texts(self, texts):
        import zlib

        self.seen.extend(texts)
        out = []
        for t in texts:
            v = self.table.get(t)
            if v is None:
                v = np.random.default_rng(zlib.crc32(t.encode())).standard_normal(self.dim)
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, dtype=np.float32)


def _official_glmcm_scores(global_f, local_f, text_f, lambda_local, t=1.0):
    """``get_ood_scores_clip`` of AtsuMiyai/GL-MCM (``--score GL-MCM``), in NumPy."""
    g = global_f / np.linalg.norm(global_f, axis=-1, keepdims=True)
    loc = local_f / np.linalg.norm(local_f, axis=-1, keepdims=True)

    def softmax(z):
        z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    smax_global = softmax(g @ text_f.T / t)
    smax_local = softmax(loc @ text_f.T / t)
    return -np.max(smax_global, axis=1) + lambda_local * -np.max(smax_local, axis=(1, 2))


# ImageNet: eval_imagenet.sh --lambda_local 0.5 (the default and the paper-imagenet preset); COCO / VOC: 1.0.
@pytest.mark.parametrize("params,lam", [({}, 0.5), ({"preset": "paper-imagenet"}, 0.5), ({"local_weight": 1.0}, 1.0)])
def test_glmcm_lambda_matches_the_official_scripts(params: dict, lam: float) -> None:
    from oodscope.backbones.base import Features
    from oodscope.detectors import create

    rng = np.random.default_rng(1)
    classes = ["cat", "dog", "car"]
    enc = _FixedTexts(8)
    det = create("glmcm", classes=classes, **params).fit(text_encoder=enc)
    assert enc.seen == [f"a photo of a {c}" for c in classes]  # the official prompt, no full stop
    assert det.lambda_ == lam and det.get_params()["local_weight"] == lam
    emb, patches = rng.standard_normal((5, 8)), rng.standard_normal((5, 7, 8))
    ours = det.score(Features(embedding=emb, patches=patches))
    text = enc.encode_texts([f"a photo of a {c}" for c in classes]).astype(np.float64)
    np.testing.assert_allclose(ours, _official_glmcm_scores(emb, patches, text, lam), rtol=0, atol=1e-6)
    explicit = create("glmcm", classes=classes, local_weight=0.25, preset="paper-imagenet")
    assert explicit.lambda_ == 0.25  # an explicit weight wins over the preset


# ===================================================================== NegLabel: prompts, corpus, selection
def _randperm_seeded(n: int, seed: int = 0) -> torch.Tensor:
    """``torch.manual_seed(seed); torch.randperm(n)`` as the official code does, without touching the
    caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.randperm(n)


def _official_grouping(pos, neg, ngroup):
    """``ScalableClassifier.grouping`` of XueJiang16/NegLabel (``random_permute=True``; the official code
    draws the permutation on the GPU, this port on the CPU, as oodscope)."""
    drop = neg.shape[1] % ngroup
    if drop > 0:
        neg = neg[:, :-drop]
    idx = _randperm_seeded(neg.shape[1])
    negs = neg.T[idx].T.reshape(pos.shape[0], ngroup, -1)
    scores = []
    for i in range(ngroup):
        full = torch.cat([pos, negs[:, i, :]], dim=-1).softmax(dim=-1)
        scores.append(full[:, : pos.shape[1]].sum(dim=-1, keepdim=True))
    return torch.cat(scores, dim=-1).mean(dim=-1)


def _official_neglabel(enc, classes, nouns, adjs, images, ngroup, neg_topk=0.15, percentile=0.95):
    """``CLIPScalableClassifier`` (multi_modal.py) with ``custom_config/clip.py``: prompts, the per
    part-of-speech 15 % selection and the score (``ScalableClassifier.forward``, t = 1, logit scale 100)."""
    def embed(texts):
        e = torch.from_numpy(enc.encode_texts(texts)).double()
        return e / e.norm(dim=-1, keepdim=True)

    pos_t = embed([f"the nice {c}" for c in classes])
    neg_t = embed([f"the nice {w}" for w in nouns] + [f"This is a {w} photo" for w in adjs])
    sim = torch.quantile(neg_t @ pos_t.T, q=percentile, dim=-1)
    ind_noun, ind_adj = torch.argsort(sim[: len(nouns)]), torch.argsort(sim[len(nouns):])
    kept = torch.cat([neg_t[: len(nouns)][ind_noun[: int(len(ind_noun) * neg_topk)]],
                      neg_t[len(nouns):][ind_adj[: int(len(ind_adj) * neg_topk)]]])
    x = images / images.norm(dim=-1, keepdim=True)
    words = [nouns[i] for i in ind_noun[: int(len(ind_noun) * neg_topk)]] + \
            [adjs[i] for i in ind_adj[: int(len(ind_adj) * neg_topk)]]
    return _official_grouping(100.0 * x @ pos_t.T, 100.0 * x @ kept.T, ngroup), words


def test_neglabel_official_recipe_matches_the_official_code() -> None:
    from oodscope.detectors import create
    from oodscope.text.lexicon import Lexicon

    classes = ["cat", "dog", "ship", "tree"]
    nouns, adjs = [f"noun{i}" for i in range(41)], [f"adj{i}" for i in range(21)]
    enc = _FixedTexts(8)
    det = create("neglabel", classes=classes, ngroups=4)
    assert det.recipe == "official" and det.get_params()["num_negatives"] is None
    det.fit(text_encoder=enc, lexicon=Lexicon(tuple(nouns + adjs), ("noun",) * 41 + ("adj",) * 21))
    images = torch.from_numpy(np.random.default_rng(4).standard_normal((12, 8)))
    official, words = _official_neglabel(enc, classes, nouns, adjs, images, ngroup=4)
    assert det.fit_info_["negative_words"] == words  # int(41 * .15) = 6 nouns, then int(21 * .15) = 3 adjectives
    assert det.fit_info_["negative_pos"] == ["noun"] * 6 + ["adj"] * 3
    assert (det.state_["negative_group"] < 0).sum() == 9 % 4
    np.testing.assert_allclose(det.score(images.numpy()), -official.numpy(), rtol=0, atol=1e-6)
    assert {"the nice cat", "the nice noun0", "This is a adj0 photo"} <= set(enc.seen)
    # oodscope's earlier recipe stays available by name: its own prompts, the M farthest jointly
    v1 = create("neglabel", classes=classes, recipe="oodscope-v1", num_negatives=9, ngroups=4)
    enc_v1 = _FixedTexts(8)
    v1.fit(text_encoder=enc_v1, lexicon=Lexicon(tuple(nouns + adjs), ("noun",) * 41 + ("adj",) * 21))
    assert "a photo of a cat." in enc_v1.seen and "a adj0 photo." in enc_v1.seen
    assert len(v1.fit_info_["negative_words"]) == 9 and (v1.state_["negative_group"] >= 0).all()


def test_neglabel_official_corpus_is_the_head_word_list() -> None:
    from oodscope.detectors import create
    from oodscope.text.lexicon import OFFICIAL_CORPUS, wordnet_lexicon

    det = create("neglabel", classes=["circle"], corpus_options={"categories": ["noun.shape", "adj.ppl"]})
    det.fit(text_encoder=_FixedTexts(8))
    corpus = wordnet_lexicon(categories=["noun.shape", "adj.ppl"], exclude=["circle"], **OFFICIAL_CORPUS)
    counts = det.fit_info_["num_candidates_by_pos"]
    assert counts == {"noun": corpus.pos.count("noun"), "adj": corpus.pos.count("adj")}
    assert len(det.fit_info_["negative_words"]) == int(counts["noun"] * 0.15) + int(counts["adj"] * 0.15)
    assert set(det.fit_info_["negative_words"]) <= set(corpus.words)


# ===================================================================== AdaNeg: the official postprocessor
class _OfficialAdaNeg:
    """``TTAPromptPostprocessor_noadagap.postprocess`` (YBZh/OpenOOD-VLM) with ``in_score="combine"``,
    ``random_permute=True``; ``text_features`` (C, D) are the ID texts then the negatives."""

    def __init__(self, text_features, class_num, *, memleng, thres, gap, lambdaval, group_num, samada, beta):
        self.text, self.class_num = text_features, class_num
        self.memory_size, self.thres, self.gap, self.lambda_val = memleng, thres, gap, lambdaval
        self.group_num, self.samada, self.beta = group_num, samada, int(beta)
        self.reset = True

    def _grouped(self, output):
        pos, neg = output[:, : self.class_num], output[:, self.class_num:]
        drop = neg.size(1) % self.group_num
        if drop > 0:
            neg = neg[:, :-drop]
        idx = _randperm_seeded(neg.shape[1])
        neg = neg.T[idx].T.reshape(pos.shape[0], self.group_num, -1)
        scores = []
        for i in range(self.group_num):
            full = torch.cat([pos, neg[:, i, :]], dim=-1).softmax(dim=-1)
            scores.append(full[:, : pos.shape[1]].sum(dim=-1, keepdim=True))
        return torch.cat(scores, dim=-1).mean(dim=-1)

    def _cache(self, indicator, pred, prob, offset, image_features):
        for i in range(indicator.size(0)):
            if not indicator[i].item():
                continue
            cate = pred[i].item() + offset
            entropy = -(prob[i] * torch.log(prob[i] + 1e-8)).sum()
            if self.indice_memory[cate] == self.memory_size:
                if (entropy < self.entropy_memory[cate]).sum() == 0:
                    continue
                replace = torch.sort(self.entropy_memory[cate])[1][-1]
                self.feat_memory[cate][replace] = image_features[i]
                self.entropy_memory[cate][replace] = entropy
            else:
                slot = self.indice_memory[cate].long()
                self.feat_memory[cate][slot] = image_features[i]
                self.entropy_memory[cate][slot] = entropy
                self.indice_memory[cate] += 1

    def postprocess(self, image_features, logit_scale=100.0):
        text, k = self.text, self.class_num
        if self.reset:
            self.feat_memory = torch.cat([text.unsqueeze(1), torch.zeros_like(text.unsqueeze(1)).repeat(
                1, self.memory_size, 1)], dim=1)
            self.indice_memory = torch.ones(text.size(0))
            self.entropy_memory = torch.zeros(self.feat_memory.size(0), self.feat_memory.size(1), dtype=text.dtype)
            self.reset = False
        output_vanilla = logit_scale * image_features @ text.t()
        conf_in_vanilla = self._grouped(output_vanilla)
        self._cache(conf_in_vanilla > (self.thres + self.gap * (1 - self.thres)),
                    output_vanilla[:, :k].max(dim=1)[1], torch.softmax(output_vanilla[:, :k], dim=1), 0,
                    image_features)
        self._cache(conf_in_vanilla < (self.thres - self.gap * self.thres),
                    output_vanilla[:, k:].max(dim=1)[1], torch.softmax(output_vanilla[:, k:], dim=1), k,
                    image_features)
        if self.samada:
            sim = torch.exp(-self.beta * (-(self.feat_memory @ image_features.t()) + 1))  # C x (1+L) x B
            sa = (sim.unsqueeze(0).transpose(0, -1) * self.feat_memory.unsqueeze(0)).sum(2)  # B x C x D
            sa = sa / sa.norm(dim=-1, keepdim=True)
        else:
            sa = self.feat_memory.mean(1)
            sa = sa / sa.norm(dim=-1, keepdim=True)
        output = logit_scale * (image_features.unsqueeze(1) * sa).sum(-1)
        return self._grouped(output) + conf_in_vanilla * self.lambda_val


def _official_adaneg_texts(enc, classes, nouns, adjs, total_ood_num):
    """``get_text_features_neg`` / ``get_selected_ood_text_list`` of OpenOOD-VLM (``text_prompt="nice"``):
    ID names and adjectives that are nouns removed, the split of ``total_ood_num`` by part of speech,
    the sorted cosine at index int(0.95 K), adjectives then nouns."""
    def embed(texts):  # float32, as the official code runs
        e = torch.from_numpy(enc.encode_texts(texts)).float()
        return e / e.norm(dim=-1, keepdim=True)

    nouns = [w for w in nouns if w not in classes]
    adjs = [w for w in adjs if w not in classes and w not in nouns]
    id_t = embed([f"The nice {c}." for c in classes])
    cos_adj = embed([f"This is a {w} photo." for w in adjs]) @ id_t.T
    cos_noun = embed([f"The nice {w}." for w in nouns]) @ id_t.T
    adj_num = int(total_ood_num * (len(adjs) / (len(adjs) + len(nouns))))
    noun_num = total_ood_num - adj_num
    at = int(len(classes) * 0.95)
    adj_sel = [adjs[i] for i in cos_adj.sort(1)[0][:, at].sort(0)[1][:adj_num]]
    noun_sel = [nouns[i] for i in cos_noun.sort(1)[0][:, at].sort(0)[1][:noun_num]]
    texts = embed([f"The nice {c}." for c in classes] + [f"This is a {w} photo." for w in adj_sel]
                  + [f"The nice {w}." for w in noun_sel])
    return texts, adj_sel + noun_sel


@pytest.mark.parametrize("sample_adaptive", [False, True])
def test_adaneg_official_matches_the_official_postprocessor(sample_adaptive: bool) -> None:
    from oodscope.detectors import create
    from oodscope.text.lexicon import Lexicon

    rng = np.random.default_rng(7)
    classes = ["cat", "dog", "ship", "tree", "lamp"]
    nouns = [f"noun{i}" for i in range(30)] + ["dog"]  # an ID name is never a negative
    adjs = [f"adj{i}" for i in range(12)] + ["noun3"]  # an adjective that is also a noun stays a noun
    enc = _FixedTexts(8)
    params = dict(classes=classes, num_negatives=14, ngroups=3, memory_size=3, batch_size=8, gap=0.2,
                  sample_adaptive=sample_adaptive, beta=5.5)
    det = create("adaneg", **params)
    assert det.official and det.recipe == "official" and det.capacity == 2 and det.beta_ == 5.0
    det.fit(text_encoder=enc, lexicon=Lexicon(tuple(nouns + adjs), ("noun",) * 31 + ("adj",) * 13))
    texts, words = _official_adaneg_texts(enc, classes, nouns, adjs, 14)
    assert det.fit_info_["negative_words"] == words
    official = _OfficialAdaNeg(texts, len(classes), memleng=3, thres=0.5, gap=0.2, lambdaval=0.1, group_num=3,
                               samada=sample_adaptive, beta=5.5)
    # a stream near the ID texts and the negative texts, plus noise; float32 as the official code runs (in
    # float64 its entropy -(p log(p + 1e-8)) can be negative for p = 1 and then overwrite the text cell)
    centres = texts.numpy()
    x = centres[rng.integers(0, len(centres), 64)] + 0.25 * rng.standard_normal((64, 8))
    x = torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True)).float()
    expected = torch.cat([official.postprocess(x[i: i + 8]) for i in range(0, 64, 8)]).numpy()
    got = det.score(x.numpy())
    np.testing.assert_allclose(got, -expected, rtol=0, atol=1e-6)
    held = (official.indice_memory - 1).long()
    assert det.memory_counts == {i: int(c) for i, c in enumerate(held) if c > 0}
    assert max(det.memory_counts.values()) == 2  # L - 1 images per label
    assert any(s < 5 for s in det.memory_counts) and any(s >= 5 for s in det.memory_counts)  # ID and OOD slots
    # the earlier reading (L images, beta as given) gives other scores on the same stream
    other = create("adaneg", **params, official=False)
    other.fit(text_encoder=enc, lexicon=Lexicon(tuple(nouns + adjs), ("noun",) * 31 + ("adj",) * 13))
    assert not np.allclose(other.score(x.numpy()), got, atol=1e-6)


# ===================================================================== the test-time-adaptive protocol
def test_audits_and_bench_share_the_adaptive_stream() -> None:
    """``pair_metrics`` (both audits) scores an adaptive detector through ``adaptive_pair_scores`` (the
    bench's function): reset, one seeded shuffled ID+OOD stream per pair, whatever was scored before."""
    from oodscope.backbones.base import Features
    from oodscope.detectors import create
    from oodscope.evaluation.audit._common import pair_metrics
    from oodscope.evaluation.metrics import auroc, fpr_at_tpr
    from oodscope.evaluation.streams import adaptive_pair_scores

    rng = np.random.default_rng(2)
    det = create("adaneg", classes=["cat", "dog"], negatives=[f"w{i}" for i in range(9)], ngroups=3,
                 batch_size=4, temperature=0.05).fit(text_encoder=_FixedTexts(8))
    id_f, ood_f = Features(embedding=rng.standard_normal((10, 8))), Features(embedding=rng.standard_normal((7, 8)))
    s_id, s_ood = adaptive_pair_scores(det, id_f, ood_f, seed=5)
    det.score(Features(embedding=rng.standard_normal((20, 8))))  # another stream in between
    m = pair_metrics(det, id_f, ood_f, id_scores=np.zeros(10), seed=5)
    assert m == {"auroc": auroc(s_id, s_ood), "fpr95": fpr_at_tpr(s_id, s_ood, 0.95)}
    order = np.random.default_rng(5).permutation(17)
    det.reset()
    stream = det.score(Features.concatenate([id_f, ood_f]).subset(order))
    np.testing.assert_array_equal(np.concatenate([s_id, s_ood])[order], stream)


def test_siglip_dense_patches_are_the_value_path_of_its_last_layer(tmp_path) -> None:
    """No official GL-MCM code exists for SigLIP: "dense" is the same value path on its last encoder
    layer, then its final layer norm (SigLIP has no projection), checked here against a hand computation."""
    from oodscope.backbones import create

    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=8),
    )
    torch.manual_seed(1)
    transformers.SiglipModel(config).save_pretrained(tmp_path)
    backbone = create(f"hf:{tmp_path}", device="cpu", patches=True)
    images = torch.randn(2, 3, 16, 16)
    patches = backbone.encode_images(images).patches
    vm = backbone.model.vision_model
    with torch.no_grad():
        h = vm(pixel_values=images, output_hidden_states=True).hidden_states[-2]
        layer = vm.encoder.layers[-1]
        a = layer.self_attn
        v = h + torch.nn.functional.linear(
            torch.nn.functional.linear(torch.nn.functional.layer_norm(h, (16,), layer.layer_norm1.weight,
                                                                      layer.layer_norm1.bias, layer.layer_norm1.eps),
                                       a.v_proj.weight, a.v_proj.bias), a.out_proj.weight, a.out_proj.bias)
        v = v + layer.mlp(layer.layer_norm2(v))
        expected = vm.post_layernorm(v)
    assert patches.shape == (2, 4, 16)
    np.testing.assert_allclose(patches, expected.numpy(), rtol=0, atol=1e-5)
    tokens = create(f"hf:{tmp_path}", device="cpu", patches="tokens").encode_images(images).patches
    assert not np.allclose(tokens, patches, atol=1e-3)
