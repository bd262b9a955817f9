"""The one error the sandbox's decisions raise; `app.py` renders it as Mosaic's `{"detail"}`."""


class ApiError(Exception):
    def __init__(
        self, status_code: int, detail: str, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers
