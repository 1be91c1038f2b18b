"""A sequence classifier that reads the mean of the encoder's outputs, as sentence encoders do.

all-MiniLM-L6-v2 and the other sentence-transformers models were trained to be read by mean
pooling over the attended positions; their [CLS] position and BERT pooler never were. Frozen,
a linear probe on the [CLS] pooler scores ~63 % on the embedded sentiment data, on the mean
~84 % (`benchmarks/baselines.py`). `MeanPooledBertForSequenceClassification` is
`BertForSequenceClassification` with that readout (the mean, L2-normalised as the model's sentence
embeddings are): the soft prompt and the new `classifier` train,
everything else stays frozen, and hf-softprompt treats it like any sequence classifier (the class
name ends in `ForSequenceClassification`; its head is called `classifier`).

With a prompt in front, the mean covers the virtual positions too: the mask the model receives
marks them as attended, so the prompt can pull the pooled vector where the head needs it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `hidden` (B, T, D) over the positions `attention_mask` (B, T) marks; all if None."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class MeanPooledBertForSequenceClassification(BertPreTrainedModel):
    """BERT encoder, L2-normalised mean over attended positions, dropout, a linear `classifier`."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.classifier_dropout or config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        """Logits (B, num_labels) from the normalised mean of the last hidden states; cross-entropy with `labels`."""
        outputs = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions, return_dict=True,
        )
        pooled = nn.functional.normalize(mean_pool(outputs.last_hidden_state, attention_mask), dim=-1)  # (B, D)
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels.view(-1))
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
