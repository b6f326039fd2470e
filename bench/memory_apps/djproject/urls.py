from django.contrib import admin
from django.urls import path

from djproject import views

urlpatterns = [
    path("", views.index),
    path("json", views.json_view),
    path("page", views.page),
    path("gc", views.collect),
    path("admin/", admin.site.urls),
]
