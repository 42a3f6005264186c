"""One step of the proxy search (`mpq search`), as a :class:`~framework.train.step.TrainingStep`.

Weights and logits are trained together on the same proxy batch (single-level, as EdMIPS/GMPQ)::

    L_task   = CE(f(x), y) [+ lambda_m * margin(features, y)]    (SEAM's large-margin term)
    grad     = the update direction of L_task for weights and logits: the method's two-pass rule
               (ASGA for asga/seam_asga), the plain gradient without one (dnas/seam)
    grad_a  += lambda_c * d penalty(E[BitOps]) / d alpha          (the logits, outside the two passes)
    SGD step of the weights and of the logits, then the weights' cosine schedule

`search.complexity.mode=dual` makes the budget a constraint instead of a fixed weight: the
Lagrangian term `lambda_t (C / B - 1)` with the multiplier updated by projected dual ascent after
every step, `lambda_{t+1} = max(0, lambda_t + eta (C_t / B - 1))` (`eta` = `complexity.dual_lr`):
C <= B. `mode=dual_target` drops the projection (lambda may turn negative), making the budget an
equality target C = B: the supernet then trains at the cost its policy will be fitted to (at least
`search.budget_fill` of B) instead of anywhere below it, while the task loss decides where the
bits go.
`search.warmup_steps` first trains the weights alone (logits frozen at their uniform start: the
supernet adapts to the proxy and to its quantizers before bits are judged, as PLiNIO/FBNet warm up).
With a Gumbel temperature (`search.quant.gumbel_tau` = tau_0) and `search.gumbel_tau_final` tau_1,
the temperature anneals exponentially over the logit steps, `tau_t = tau_0 (tau_1 / tau_0)^(t / T)`.

The recorded terms (`ce`, `margin`, `complexity`, `expected_gbitops`) are those at the unperturbed
weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from framework.errors import MPQError
from framework.quant import complexity_penalty, expected_bitops
from framework.search.objectives import CenterMarginLoss, PenultimateFeatures
from framework.sharpness import TwoPassOptimizer, build_rule
from framework.train.optim import cosine_with_warmup
from framework.train.step import Batch, StepOutput

LOGITS = ("alpha_w", "alpha_a")


class SearchStep:
    """One search step on a proxy batch: the task loss through the method's two-pass optimizer
    (weights and logits together), the complexity gradient added to the logits outside the two
    passes, then the weights' cosine schedule. Call it as `step((images, labels))`.
    """

    def __init__(self, model: nn.Module, scfg, num_classes: int, penalty_mode: str, reference: float, device,
                 budget: float | None = None):
        self.model = model
        self.lambda_c = float(scfg.complexity.weight)
        self.penalty_mode, self.reference = penalty_mode, float(reference)
        mode = str(scfg.complexity.get("mode", "penalty"))
        self.dual = mode in ("dual", "dual_target")
        self.projected = mode == "dual"  # lambda >= 0 (C <= B); dual_target: lambda free (C -> B)
        if self.dual and not budget:
            raise MPQError("search.complexity.mode=dual needs a BitOps budget: set search.budget_uniform_bits or "
                           "search.budget_bitops")
        self.budget, self.dual_lr = budget, float(scfg.complexity.get("dual_lr", 0.0))
        self.multiplier = float(scfg.complexity.get("lambda_init", 0.0))  # the Lagrange multiplier (dual mode)
        self.warmup_steps = int(scfg.get("warmup_steps") or 0)
        self.steps_taken = 0
        self.tau0 = scfg.quant.get("gumbel_tau")
        self.tau1 = scfg.get("gumbel_tau_final")
        if self.tau1 is not None and not self.tau0:
            raise MPQError("search.gumbel_tau_final anneals a Gumbel temperature: set search.quant.gumbel_tau too")
        self.total_steps = 0
        self.logits = [p for n, p in model.named_parameters() if n.endswith(LOGITS)]
        weights = [p for n, p in model.named_parameters() if not n.endswith(LOGITS)]
        # multi-tensor updates (torch picks them by itself on CUDA only): a supernet has hundreds of small
        # parameters (logits, ranges), and one op per group costs less than one per tensor; same floats
        self.opt_w = torch.optim.SGD(weights, lr=float(scfg.lr_weights), momentum=float(scfg.momentum),
                                     weight_decay=float(scfg.weight_decay), foreach=True)
        if str(scfg.logit_optimizer) == "adam":  # a step of ~lr per logit whatever the gradient's scale (DARTS)
            self.opt_a = torch.optim.Adam(self.logits, lr=float(scfg.lr_logits), betas=(0.5, 0.999),
                                          weight_decay=float(scfg.logit_weight_decay), foreach=True)
        else:
            self.opt_a = torch.optim.SGD(self.logits, lr=float(scfg.lr_logits), momentum=float(scfg.momentum),
                                         weight_decay=float(scfg.logit_weight_decay), foreach=True)
        self.scheduler = None
        sharp = scfg.sharpness
        try:
            self.rule = build_rule(sharp) if str(sharp.name) != "none" else None
        except ValueError as err:
            raise MPQError(f"search.sharpness: {err}") from None
        self.two_pass = TwoPassOptimizer(model, [self.opt_w, self.opt_a], self.rule, period=int(sharp.period or 1))
        self.margin_weight = float(scfg.margin.weight)
        self.features = PenultimateFeatures(model) if self.margin_weight > 0 else None
        self.margin_loss = None
        if self.features is not None:
            dim = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].in_features
            self.margin_loss = CenterMarginLoss(num_classes, dim, float(scfg.margin.margin), float(scfg.margin.momentum)).to(device)
        self.criterion = nn.CrossEntropyLoss()
        self.last_terms: dict[str, float] = {}
        self.images_processed = 0  # forward passes x batch size: a two-pass step counts its images twice

    def schedule(self, total_steps: int) -> None:
        """Cosine decay of the weights' learning rate over `total_steps` (the logits keep theirs)."""
        self.total_steps = int(total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.opt_w, lambda s: cosine_with_warmup(s, total_steps, 0, 0.0))

    @property
    def warming_up(self) -> bool:
        return self.steps_taken < self.warmup_steps

    def _set_phase(self) -> None:
        """Logits frozen during the warm-up; the annealed Gumbel temperature after it."""
        for p in self.logits:
            p.requires_grad_(not self.warming_up)
        if self.tau1 is not None:
            span = max(self.total_steps - self.warmup_steps - 1, 1)
            t = min(max(self.steps_taken - self.warmup_steps, 0) / span, 1.0)
            tau = float(self.tau0) * (float(self.tau1) / float(self.tau0)) ** t
            for module in self.model.modules():
                if hasattr(module, "gumbel_tau") and hasattr(module, "alpha_w"):
                    module.gumbel_tau = tau
            self.last_terms["gumbel_tau"] = tau

    def _add_dual_gradient(self) -> None:
        """The Lagrangian term's gradient on the logits, then the multiplier's projected ascent step."""
        expected = expected_bitops(self.model)
        violation = expected / float(self.budget) - 1.0
        if not self.warming_up:
            term = self.multiplier * violation
            if term.requires_grad and self.multiplier != 0:
                grads = torch.autograd.grad(term, self.logits, allow_unused=True)
                for p, g in zip(self.logits, grads, strict=True):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad + g
            self.multiplier = self.multiplier + self.dual_lr * float(violation.detach())
            if self.projected:
                self.multiplier = max(0.0, self.multiplier)
        self.last_terms["complexity"] = float((self.multiplier * violation).detach())
        self.last_terms["lambda"] = self.multiplier
        self.last_terms["expected_gbitops"] = float(expected.detach()) / 1e9

    def _add_complexity_gradient(self) -> None:
        if self.dual:
            self._add_dual_gradient()
            return
        if self.lambda_c == 0.0 or self.warming_up:  # no gradient to add: the terms are recorded without a graph
            with torch.no_grad():
                expected = expected_bitops(self.model)
            self.last_terms["complexity"] = 0.0
            self.last_terms["expected_gbitops"] = float(expected) / 1e9
            return
        expected = expected_bitops(self.model)
        penalty = self.lambda_c * complexity_penalty(expected, self.penalty_mode, self.reference)
        if penalty.requires_grad:
            grads = torch.autograd.grad(penalty, self.logits, allow_unused=True)
            for p, g in zip(self.logits, grads, strict=True):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
        self.last_terms["complexity"] = float(penalty.detach())
        self.last_terms["expected_gbitops"] = float(expected.detach()) / 1e9

    def __call__(self, batch: Batch) -> StepOutput:
        images, labels = batch
        outputs: list[torch.Tensor] = []
        self._set_phase()

        def closure() -> torch.Tensor:
            first_pass = not outputs
            out = self.model(images)
            outputs.append(out.detach())
            loss = self.criterion(out, labels)
            if first_pass:  # the terms at theta, not at the perturbed point
                self.last_terms["ce"] = float(loss.detach())
            if self.margin_loss is not None:
                self.margin_loss.train(first_pass)  # class centres move once per step, like BN statistics
                margin = self.margin_loss(self.features.features, labels)
                if first_pass:
                    self.last_terms["margin"] = float(margin.detach())
                loss = loss + self.margin_weight * margin
            loss.backward()
            return loss

        info = self.two_pass.step(closure, before_update=self._add_complexity_gradient)
        self.steps_taken += 1
        self.images_processed += len(images) * len(outputs)
        if self.scheduler is not None:
            self.scheduler.step()
        if self.rule is not None and "rho" in info:
            info["gap"] = getattr(self.rule, "last_gap", info.get("loss_perturbed", 0.0) - info["loss"])
        return StepOutput(torch.tensor(info["loss"]), outputs[0], {**info, **self.last_terms})

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer_w": self.opt_w.state_dict(), "optimizer_a": self.opt_a.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None, "two_pass": self.two_pass.state_dict(),
                "margin": self.margin_loss.state_dict() if self.margin_loss is not None else None,
                "images_processed": self.images_processed, "steps_taken": self.steps_taken, "multiplier": self.multiplier}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt_w.load_state_dict(state["optimizer_w"])
        self.opt_a.load_state_dict(state["optimizer_a"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.two_pass.load_state_dict(state["two_pass"])
        self.images_processed = int(state.get("images_processed", 0))
        self.steps_taken = int(state.get("steps_taken", self.two_pass.step_count))
        self.multiplier = float(state.get("multiplier", self.multiplier))
        if self.margin_loss is not None and state.get("margin"):
            self.margin_loss.load_state_dict(state["margin"])

    def close(self) -> None:
        if self.features is not None:
            self.features.remove()
