"""transformers.Trainer with FusedRegionAdamW: trains MiniLM on real GLUE data and resumes from a checkpoint."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from lrdist.data import encode  # noqa: E402
from lrdist.hf import region_optimizer  # noqa: E402

SCALES = [1, 1, 0.3, 0.7, 1, 1, 1, 1, 1, 3]


class Rows(torch.utils.data.Dataset):
    def __init__(self, enc):
        self.enc = enc

    def __len__(self):
        return len(self.enc)

    def __getitem__(self, i):
        row = {k: v[i] for k, v in self.enc.features.items()}
        row["labels"] = int(self.enc.labels[i])
        return row


def make_trainer(path, out, data, tok, **extra):
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    opt = region_optimizer(model, "bert10", lr=1e-4, region_scales=SCALES)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=4, save_strategy="steps", save_steps=2,
        logging_steps=1, max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=1, seed=0, use_cpu=True,
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, **extra)
    return transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None),
                                data_collator=transformers.DataCollatorWithPadding(tok))


def test_trainer_trains_and_resumes_with_optimizer_state(minilm_path, glue_dir, tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    data = Rows(encode(tok, "rte", "train", 64, 32, glue_dir))
    full = make_trainer(minilm_path, tmp_path / "full", data, tok)
    full.train()
    assert full.state.global_step == 4
    lrs = [h["learning_rate"] for h in full.state.log_history if "learning_rate" in h]
    assert max(lrs) <= 1e-4 and lrs[-1] < max(lrs)  # the Trainer's cosine schedule drove our group LRs
    saved = torch.load(tmp_path / "full" / "checkpoint-2" / "optimizer.pt", weights_only=False)
    assert saved["region_scales"].tolist() == SCALES

    resumed = make_trainer(minilm_path, tmp_path / "full", data, tok)
    resumed.create_optimizer_and_scheduler(num_training_steps=4)
    resumed._load_optimizer_and_scheduler(str(tmp_path / "full" / "checkpoint-2"))
    loaded = resumed.optimizer.state_dict()
    for k, st in saved["state"].items():  # the optimizer state is back intact
        for name, value in st.items():
            assert torch.equal(loaded["state"][k][name], value), name
    assert resumed.optimizer.region_scales.tolist() == SCALES

    again = make_trainer(minilm_path, tmp_path / "full", data, tok)
    again.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert again.state.global_step == 4
    for (name, a), b in zip(full.model.named_parameters(), again.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
