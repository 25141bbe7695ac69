"""The review console's web application: server-rendered pages (FastAPI + Jinja2), no front-end
build. It reads the registry, the run folders and the model base path the CLI reads, and acts
through the same functions as `tumorflow approve|reject|rollback|promote`."""

from __future__ import annotations

import base64
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from tumorflow.console import audit, evidence
from tumorflow.console.auth import SESSION_COOKIE, Authenticator, NotSignedIn
from tumorflow.core.config import ConsoleConfig, DicomConfig
from tumorflow.core.errors import TumorflowError

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class ConsoleSettings:
    """Where the console reads and writes: what `tumorflow ui` resolves from the configuration."""

    console: ConsoleConfig
    run_root: Path
    tracking_uri: str
    model_base_path: str
    model_name: str
    keep_versions: int = 2
    # How "Try a scan" turns an uploaded DICOM file into the PNG the model is sent: the window
    # training used (`dataset.dicom`).
    dicom: DicomConfig = field(default_factory=DicomConfig)
    # The trust root decisions are verified against (release.trust_root); empty:
    # `<run_root>/trust_root.yaml`.
    trust_root: str = ""

    @property
    def trust_root_uri(self) -> str:
        return self.trust_root or str(Path(self.run_root) / "trust_root.yaml")

    def signer(self):
        """The console's delegate key (console.signing_key, else `<run_root>/keys/console`): it
        signs each decision for the user the console authenticated."""
        from tumorflow.components.release.signing import load_signer

        return load_signer(
            self.console.signing_key or Path(self.run_root) / "keys" / "console", "console"
        )

    def trust(self):
        from tumorflow.components.release.trust_root import TrustRoot

        return TrustRoot.load(self.trust_root_uri)

    @property
    def audit_path(self) -> Path:
        return Path(self.console.audit_log or Path(self.run_root) / "audit.jsonl")

    def models(self) -> list[str]:
        named = [m for m in self.console.roles if m != "*"]
        return list(dict.fromkeys([self.model_name, *named]))

    def mlflow_url(self) -> str | None:
        uri = self.tracking_uri
        return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


class Forbidden(Exception):
    """The signed-in user lacks the role an action needs."""


def create_app(settings: ConsoleSettings) -> FastAPI:
    """The console application for `settings`."""
    auth = Authenticator.for_config(settings.console)
    templates = Jinja2Templates(directory=str(TEMPLATES))
    app = FastAPI(title="tumorflow review console", docs_url=None, redoc_url=None)

    def user_of(request: Request) -> str:
        return auth.identity(dict(request.headers), dict(request.cookies))

    def page(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        user = context.pop("user", None)
        return templates.TemplateResponse(
            request,
            name,
            {
                "user": user,
                "csrf": auth.csrf_token(user) if user else "",
                "auth_mode": settings.console.auth,
                **context,
            },
            status_code=status_code,
        )

    def require(request: Request, role: str, model_name: str, csrf: str | None = None) -> str:
        user = user_of(request)
        if csrf is not None and not auth.csrf_valid(user, csrf):
            raise Forbidden("the form's CSRF token is missing or wrong; reload the page")
        if not auth.may(user, role, model_name):
            raise Forbidden(f"{user} is no {role} of {model_name}")
        return user

    @app.exception_handler(NotSignedIn)
    async def _not_signed_in(request: Request, exc: NotSignedIn) -> Response:
        if settings.console.auth == "token" and request.method == "GET":
            return RedirectResponse("/login", status_code=303)
        return HTMLResponse(f"not signed in: {exc}", status_code=401)

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        user = None
        with contextlib.suppress(NotSignedIn):
            user = user_of(request)
        return page(request, "message.html", 403, user=user, title="Refused", message=str(exc))

    @app.exception_handler(TumorflowError)
    async def _refused(request: Request, exc: TumorflowError) -> Response:
        return page(
            request, "message.html", 409, user=user_of(request), title="Not done", message=str(exc)
        )

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request) -> Response:
        return page(request, "login.html", error="")

    @app.post("/login")
    def login(request: Request, token: Annotated[str, Form()] = "") -> Response:
        user = auth.user_for_token(token.strip())
        if user is None:
            return page(request, "login.html", 401, error="unknown token")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            SESSION_COOKIE, auth.session_cookie(user), httponly=True, samesite="strict"
        )
        return response

    @app.post("/logout")
    def logout(request: Request, csrf: Annotated[str, Form()] = "") -> Response:
        user = user_of(request)
        if not auth.csrf_valid(user, csrf):
            raise Forbidden("the form's CSRF token is missing or wrong; reload the page")
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    @app.get("/", response_class=HTMLResponse)
    def runs(request: Request) -> Response:
        user = user_of(request)
        models = [m for m in settings.models() if auth.may(user, "viewer", m)]
        listed = evidence.list_runs(settings.tracking_uri, models, settings.run_root)
        return page(request, "runs.html", user=user, runs=listed)

    def _candidate(pipeline_run: str) -> evidence.CandidateRow:
        for run in evidence.list_runs(settings.tracking_uri, settings.models(), settings.run_root):
            if run.pipeline_run == pipeline_run:
                return run
        raise Forbidden(f"no run {pipeline_run} of a model this console shows")

    @app.get("/runs/{pipeline_run}", response_class=HTMLResponse)
    def review(request: Request, pipeline_run: str) -> Response:
        run = _candidate(pipeline_run)
        user = require(request, "viewer", run.model_name)
        return page(
            request,
            "review.html",
            user=user,
            run=run,
            evidence=evidence.run_evidence(settings.run_root, pipeline_run),
            may_decide=auth.may(user, "approver", run.model_name),
            mlflow=settings.mlflow_url(),
        )

    @app.get("/runs/{pipeline_run}/files/{relative:path}")
    def run_file(request: Request, pipeline_run: str, relative: str) -> Response:
        run = _candidate(pipeline_run)
        require(request, "viewer", run.model_name)
        folder = evidence.run_folder(settings.run_root, pipeline_run)
        if folder is None:
            return Response(status_code=404)
        target = (folder / relative).resolve()
        if not target.is_file() or not target.is_relative_to(folder.resolve()):
            return Response(status_code=404)
        return FileResponse(target)

    @app.post("/runs/{pipeline_run}/decide")
    def decide(
        request: Request,
        pipeline_run: str,
        action: Annotated[str, Form()],
        reason: Annotated[str, Form()] = "",
        csrf: Annotated[str, Form()] = "",
    ) -> Response:
        from tumorflow.components.release.approval import APPROVED, REJECTED, record_decision
        from tumorflow.components.release.trust_root import utc_now

        run = _candidate(pipeline_run)
        user = require(request, "approver", run.model_name, csrf)
        if action not in ("approve", "reject", "override"):
            raise Forbidden(f"unknown action {action!r}")
        # Signed with the console's delegate key for the user it authenticated, and verified
        # against the trust root (the user must be an approver there too) before it is stored.
        record_decision(
            settings.tracking_uri,
            pipeline_run,
            REJECTED if action == "reject" else APPROVED,
            comment=reason.strip() or None,
            signer=settings.signer(),
            trust=settings.trust(),
            identity=user,
            authenticated_via=auth.how(utc_now()),
            override=action == "override",
            model_name=run.model_name,
            audit_log=str(settings.audit_path),
        )
        return RedirectResponse(f"/runs/{pipeline_run}", status_code=303)

    @app.get("/models", response_class=HTMLResponse)
    def models(request: Request) -> Response:
        from tumorflow.components.release.deploy import model_status

        user = user_of(request)
        trust = settings.trust() if Path(settings.trust_root_uri).exists() else None
        shown = [
            {
                **model_status(settings.tracking_uri, m, settings.model_base_path, trust=trust),
                "may_move": auth.may(user, "rollback", m),
            }
            for m in settings.models()
            if auth.may(user, "viewer", m)
        ]
        history = [e for e in audit.read_events(settings.audit_path) if e["what"] != "approval"]
        return page(request, "models.html", user=user, models=shown, history=history)

    @app.get("/models/{model_name}/{action}", response_class=HTMLResponse)
    def confirm_move(
        request: Request, model_name: str, action: str, to: int | None = None
    ) -> Response:
        user = require(request, "rollback", model_name)
        if action not in ("rollback", "promote"):
            return Response(status_code=404)
        return page(request, "confirm.html", user=user, model_name=model_name, action=action, to=to)

    @app.post("/models/{model_name}/{action}")
    def move(
        request: Request,
        model_name: str,
        action: str,
        to: Annotated[str, Form()] = "",
        reason: Annotated[str, Form()] = "",
        csrf: Annotated[str, Form()] = "",
    ) -> Response:
        from tumorflow.components.release.deploy import promote_canary, rollback
        from tumorflow.components.release.trust_root import utc_now

        user = require(request, "rollback", model_name, csrf)
        signing = {
            "keep_versions": settings.keep_versions,
            "trust": settings.trust(),
            "signer": settings.signer(),
            "identity": user,
            "authenticated_via": auth.how(utc_now()),
            "reason": reason.strip(),
            "audit_log": str(settings.audit_path),
        }
        if action == "promote":
            promote_canary(settings.tracking_uri, model_name, settings.model_base_path, **signing)
        elif action == "rollback":
            rollback(
                settings.tracking_uri,
                model_name,
                settings.model_base_path,
                int(to) if to.strip() else None,
                **signing,
            )
        else:
            return Response(status_code=404)
        return RedirectResponse("/models", status_code=303)

    @app.get("/audit", response_class=HTMLResponse)
    def audit_page(request: Request) -> Response:
        user = user_of(request)
        events = [
            e
            for e in audit.read_events(settings.audit_path)
            if auth.may(user, "viewer", e.get("model_name", ""))
        ]
        return page(
            request,
            "audit.html",
            user=user,
            events=events,
            verdict=audit.verdict(settings.audit_path),
        )

    @app.get("/models/{model_name}/versions/{version}", response_class=HTMLResponse)
    def release_page(request: Request, model_name: str, version: str) -> Response:
        """One version's release record: data, metrics with CIs, gate rules, signed decisions."""
        from tumorflow.components.release.release_record import render_text
        from tumorflow.pipelines.release_sources import load_trust, release_record_of

        user = require(request, "viewer", model_name)
        record = release_record_of(
            settings.tracking_uri,
            settings.run_root,
            model_name,
            version,
            audit_log_uri=str(settings.audit_path),
            trust=load_trust(settings.trust_root_uri),
        )
        return page(request, "release.html", user=user, record=record, text=render_text(record))

    @app.get("/scan", response_class=HTMLResponse)
    def scan_form(request: Request) -> Response:
        return page(request, "scan.html", user=user_of(request), results=[], error="")

    @app.post("/scan", response_class=HTMLResponse)
    async def scan(
        request: Request,
        image: Annotated[UploadFile, File()],
        csrf: Annotated[str, Form()] = "",
    ) -> Response:
        """Classify an upload over the model server's gRPC API. A DICOM file is decoded here, by
        the decode training and `tumorflow predict` use, and sent as PNG (a slice per frame)."""
        from tumorflow.components.data.dicom import DicomDecodeError
        from tumorflow.components.evaluation.overlays import overlay_heatmap
        from tumorflow.serving.client import ModelTarget, encoded_images, explain_grpc

        user = require(request, "viewer", settings.model_name, csrf)
        data = await image.read()
        try:
            sent = encoded_images(image.filename or "scan", data, settings.dicom)
            answers = explain_grpc(
                settings.console.model_server,
                [png for _, png in sent],
                ModelTarget(settings.model_name),
            )
        except (TumorflowError, DicomDecodeError) as exc:
            return page(request, "scan.html", 400, user=user, results=[], error=str(exc))
        results = [
            {
                "name": name,
                "prediction": answer.prediction,
                "overlay": base64.b64encode(overlay_heatmap(png, answer.heatmap)).decode(),
            }
            for (name, png), answer in zip(sent, answers, strict=True)
        ]
        return page(request, "scan.html", user=user, error="", results=results)

    return app
