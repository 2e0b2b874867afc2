import torch

from kernels import dynamic_route, plan_from_dense, plan_from_slots, slots_from_dense


def test_plan_groups_pairs_by_slot_and_maps_back_to_tokens():
    slots = torch.tensor([[3, -1, 0], [0, 3, -1], [-1, -1, -1], [5, 0, 3]])
    weights = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    plan = plan_from_slots(slots, weights)
    assert plan.num_pairs == 7 and plan.num_tokens == 4
    assert plan.pair_slot.tolist() == [0, 0, 0, 3, 3, 3, 5]
    assert plan.pair_token.tolist() == [0, 1, 3, 0, 1, 3, 3]  # stable: token order within a slot
    assert plan.pair_weight.tolist() == [2.0, 3.0, 10.0, 0.0, 4.0, 11.0, 9.0]
    assert plan.seg_slot.tolist() == [0, 3, 5]
    assert plan.seg_start.tolist() == [0, 3, 6] and plan.seg_len.tolist() == [3, 3, 1]
    assert plan.max_seg_len == 3


def test_empty_plan():
    plan = plan_from_slots(torch.full((2, 1), -1), torch.zeros(2, 1))
    assert plan.num_pairs == 0 and plan.num_segments == 0 and plan.max_seg_len == 0


def test_slots_from_dense_drops_zeros_and_offsets_by_bank():
    w = torch.tensor([[0.5, 0.0, 0.2], [0.0, 0.0, 0.0], [0.1, 0.3, 0.6], [0.4, 0.4, 0.2]])
    bank_offset = torch.tensor([6, 0, 3, -1])
    slots, ws = slots_from_dense(w, bank_offset)
    assert slots.shape == (4, 3)  # K = max pairs of any token = 3 (token 2)
    assert slots.tolist() == [[6, 8, -1], [-1, -1, -1], [5, 4, 3], [-1, -1, -1]]
    torch.testing.assert_close(ws, torch.tensor([[0.5, 0.2, 0], [0, 0, 0], [0.6, 0.3, 0.1], [0, 0, 0]]))


def test_k_is_as_small_as_the_step_allows():
    logits = torch.tensor([[8.0, 0, 0, 0, 0, 0]] * 5)  # peaked: keep_top_k=2 pairs per token
    w, _ = dynamic_route(logits)
    plan = plan_from_dense(w, torch.tensor([0, 6, 6, 12, 0]))
    assert plan.slots.shape == (5, 2)
    assert plan.num_pairs == 10


def test_static_plan_has_the_same_pairs_without_a_host_sync():
    slots = torch.tensor([[3, -1, 0], [0, 3, -1], [-1, -1, -1], [5, 0, 3]])
    weights = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    plan = plan_from_slots(slots, weights, num_slots=7)
    ref = plan_from_slots(slots, weights)
    assert plan.num_pairs == 12 and plan.num_segments == 7 and plan.max_seg_len == 4
    assert plan.seg_len.tolist() == [3, 0, 0, 3, 0, 1, 0]
    p = ref.num_pairs  # the valid pairs come first, in the dynamic plan's order
    assert plan.pair_slot[:p].tolist() == ref.pair_slot.tolist()
    assert plan.pair_token[:p].tolist() == ref.pair_token.tolist()
    assert plan.pair_weight[:p].tolist() == ref.pair_weight.tolist()
    assert (plan.pair_slot[p:] == 6).all() and (plan.pair_weight[p:] == 0).all()
    w = torch.tensor([[0.5, 0.0, 0.2], [0.1, 0.3, 0.6]])
    s, _ = slots_from_dense(w, torch.tensor([0, 3]), static=True)
    assert s.shape == (2, 3)  # K = E: no data-dependent size
