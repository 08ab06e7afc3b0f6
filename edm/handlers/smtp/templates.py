"""Jinja2 templates of ``smtp.templates``, rendered in the sandbox.

A job's ``template: welcome`` renders ``welcome.txt`` and/or ``welcome.html``, and its
``subject`` as a template too. HTML is autoescaped, an undefined variable is an error, and a
template is read once (the environment never looks at the file again): ``edm reload`` builds a
new handler, and so a new environment, when the directory changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from edm.handlers.smtp.job import InvalidJob, Job

MAX_SUBJECTS = 256  # compiled subjects kept; jobs usually share a handful


@dataclass(frozen=True)
class Content:
    subject: str
    text: str | None
    html: str | None


class Templates:
    """The sandboxed environment of one handler (one thread)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        loader = jinja2.FileSystemLoader(str(directory)) if directory is not None else None
        self.env = SandboxedEnvironment(
            loader=loader,
            autoescape=jinja2.select_autoescape(enabled_extensions=("html", "htm"), default_for_string=False),
            undefined=jinja2.StrictUndefined,
            auto_reload=False,
            cache_size=-1,
        )
        self._subjects: dict[str, jinja2.Template] = {}
        self._missing: set[str] = set()  # looked for once, like the templates found

    def content(self, job: Job) -> Content:
        """The job's subject and parts: as given, or rendered from its template."""
        if job.template is None:
            return Content(job.subject, job.text, job.html)
        if self.directory is None:
            raise InvalidJob("template", "templates are not enabled (set smtp.templates)")
        text = self._render_file(f"{job.template}.txt", job.vars)
        html = self._render_file(f"{job.template}.html", job.vars)
        if text is None and html is None:
            raise InvalidJob("template", f"no {job.template}.txt nor {job.template}.html in smtp.templates")
        subject = self._render_subject(job.subject, job.vars) if job.subject else ""
        if "\r" in subject or "\n" in subject:
            raise InvalidJob("subject", "the rendered subject holds CR or LF")
        return Content(
            subject, text if text is not None else job.text, html if html is not None else job.html
        )

    def _render_file(self, name: str, variables: Mapping[str, Any]) -> str | None:
        if name in self._missing:
            return None
        try:
            template = self.env.get_template(name)
        except jinja2.TemplateNotFound:
            self._missing.add(name)
            return None
        except jinja2.TemplateSyntaxError as exc:
            raise InvalidJob("template", f"{name} line {exc.lineno}: {exc.message}") from None
        return self._render(template, variables, "template", name)

    def _render_subject(self, subject: str, variables: Mapping[str, Any]) -> str:
        template = self._subjects.get(subject)
        if template is None:
            try:
                template = self.env.from_string(subject)
            except jinja2.TemplateSyntaxError as exc:
                raise InvalidJob("subject", f"template error: {exc.message}") from None
            if len(self._subjects) >= MAX_SUBJECTS:
                self._subjects.clear()
            self._subjects[subject] = template
        return self._render(template, variables, "subject", "subject")

    @staticmethod
    def _render(template: jinja2.Template, variables: Mapping[str, Any], field: str, name: str) -> str:
        try:
            return template.render(variables)
        except jinja2.UndefinedError as exc:
            raise InvalidJob("vars", f"{name}: {exc.message}") from None
        except jinja2.TemplateError as exc:  # SecurityError included
            raise InvalidJob(field, f"{name}: {type(exc).__name__}: {exc.message}") from None
        except (ArithmeticError, TypeError, ValueError, LookupError, RecursionError, MemoryError) as exc:
            raise InvalidJob(field, f"{name}: {type(exc).__name__}: {str(exc)[:200]}") from None
